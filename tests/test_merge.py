"""Merge engine: every method against a dense computation written here, ACM ≡ plain at λ = α,
per-group λ, vocabulary growth, dtypes, sharded output that transformers loads.

The reference below loads whole state dicts and applies the formulas of docs/design.md "Merge methods"
directly (sort-based thresholds, explicit sign election), independently of ``acm.merging.kernels``;
only the DARE random stream is shared (its seeding is the documented contract).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acm.errors import InputError
from acm.merging.engine import METHODS, MergeOptions, merge_models
from acm.merging.kernels import stable_seed
from tests.fixtures import VOCAB_SIZE, make_pair, make_tiny_model

TV_METHODS = [m for m in METHODS if m != "linear"]


# ---------------------------------------------------------------------------------------------
# helpers: load state dicts, group names, and the dense reference
# ---------------------------------------------------------------------------------------------

def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def group_of(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return f"block.{m.group(1)}"
    if "embed_tokens" in name:
        return "embed"
    assert name in ("model.norm.weight", "lm_head.weight"), name
    return "head"


def groups(num_layers: int = 2) -> list[str]:
    return ["embed"] + [f"block.{k}" for k in range(num_layers)] + ["head"]


def top_k_mask(a: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly k = round(density·n) entries of largest |a| (ties: lowest flat index first), by a stable sort."""
    flat = a.abs().reshape(-1)
    k = max(1, min(flat.numel(), int(round(density * flat.numel()))))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return (keep & (flat > 0)).view(a.shape)


def dare_reference(tau: torch.Tensor, p: float, seed: int, i: int, name: str) -> torch.Tensor:
    """DARE as documented in ``acm.merging.kernels.random_drop.DropStream`` (CPU): random bytes + exact tie-break."""
    n = tau.numel()
    rng = np.random.Generator(np.random.PCG64(stable_seed(seed, i, name)))
    b = rng.integers(0, 2**64, size=-(-n // 8), dtype=np.uint64).view(np.uint8)[:n]
    t, f = int(np.floor(p * 256)), p * 256 - int(np.floor(p * 256))
    keep = b > t
    ties = np.flatnonzero(b == t)
    v = np.random.Generator(np.random.PCG64(stable_seed(seed, i, name + "/tie"))).random(ties.size, dtype=np.float32)
    keep[ties[v >= f]] = True
    return tau * (torch.from_numpy(keep).view(tau.shape).float() * (1.0 / (1.0 - p)))


def breadcrumbs_mask(a: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: ranks t … t+k−1 of |a| (descending, ties: lowest flat index first), k = round(density·n)
    (at least 1), t = min(round(gamma·n), n − k) outliers; by a stable sort."""
    flat = a.abs().reshape(-1)
    n = flat.numel()
    k = max(1, min(n, int(round(density * n))))
    t = max(0, min(int(round(gamma * n)), n - k))
    order = torch.sort(flat, descending=True, stable=True).indices[t:t + k]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order] = True
    return (keep & (flat > 0)).view(a.shape)


def della_reference(tau: torch.Tensor, density: float, epsilon: float, seed: int, i: int, name: str) -> torch.Tensor:
    """DELLA as documented in ``acm.merging.kernels.rank_drop`` (module docstring): per row, keep probability
    p = density − ε + 2ε·rank/(m−1) by ascending |τ| rank (ties: lower index first), float32 uniforms
    u from PCG64(stable_seed(seed, i, name + "/della")) in flat order, kept iff u < p, rescaled by 1/p."""
    t = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    a = t.abs().numpy()
    m = a.shape[1]
    ranks = np.empty(a.shape, dtype=np.int64)
    order = np.argsort(a, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(m)[None, :].repeat(a.shape[0], 0), axis=1)
    if m > 1:
        p = ranks.astype(np.float32) * np.float32(2 * epsilon / (m - 1)) + np.float32(density - epsilon)
    else:
        p = np.full(a.shape, density, dtype=np.float32)
    u = np.random.Generator(np.random.PCG64(stable_seed(seed, i, name + "/della"))).random(
        t.numel(), dtype=np.float32).reshape(a.shape)
    scale = np.where(u < p, np.float32(1) / p, np.float32(0)).astype(np.float32)
    return (t * torch.from_numpy(scale)).view(tau.shape)


def reference(method: str, base: dict, fts: list[dict], lams: list[dict], *, density=0.2, drop=0.3, seed=0,
              normalize=False, weights=None, global_trim=False, gamma=0.01, epsilon=0.15) -> dict[str, torch.Tensor]:
    """θ from the docs/design.md formulas, in float32, on whole state dicts."""
    out = {}
    taus_all = {}
    for name, b0 in base.items():
        b = b0.float()
        fs = [sd[name].float() for sd in fts]
        if method == "linear":
            w = weights or [1.0] * len(fts)
            w = [x / sum(w) for x in w]
            out[name] = sum(wi * f for wi, f in zip(w, fs))
            continue
        taus = [f - b for f in fs]
        if method in ("dare_ta", "dare_ties"):
            taus = [dare_reference(t, drop, seed, i, name) for i, t in enumerate(taus)]
        if method in ("della", "della_linear"):
            taus = [della_reference(t, density, epsilon, seed, i, name) for i, t in enumerate(taus)]
        if method in ("breadcrumbs", "breadcrumbs_ties"):
            taus = [torch.where(breadcrumbs_mask(t, density, gamma), t, torch.zeros_like(t)) for t in taus]
        taus_all[name] = taus
    if method == "linear":
        return out
    global_masks: dict[str, list[torch.Tensor]] = {}
    if global_trim:       # one selection per model over all tensors, in (sorted name, flat index) order
        names = sorted(taus_all)
        for i in range(len(fts)):
            whole = top_k_mask(torch.cat([taus_all[n][i].reshape(-1) for n in names]), density)
            start = 0
            for n in names:
                size = taus_all[n][i].numel()
                global_masks.setdefault(n, []).append(whole[start:start + size].view(taus_all[n][i].shape))
                start += size
    for name, taus in taus_all.items():
        b = base[name].float()
        lam = [lam_of[group_of(name)] for lam_of in lams]
        if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
            trimmed = []
            for i, t in enumerate(taus):
                if method in ("breadcrumbs_ties", "della"):       # sparsified above; no magnitude trim
                    trimmed.append(t)
                    continue
                keep = global_masks[name][i] if global_trim else top_k_mask(t, density)
                trimmed.append(torch.where(keep, t, torch.zeros_like(t)))
            contrib = [w * t for w, t in zip(lam, trimmed)]
            elected = torch.sign(sum(contrib))
            agree = [(torch.sign(c) == elected) & (c != 0) for c in contrib]
            delta = sum(torch.where(a, c, torch.zeros_like(c)) for a, c in zip(agree, contrib))
            if normalize:
                denom = sum(a.float() * w for a, w in zip(agree, lam))
                delta = torch.where(denom > 0, delta / denom.clamp_min(1e-30), torch.zeros_like(delta))
            out[name] = b + delta
        else:
            out[name] = b + sum(w * t for w, t in zip(lam, taus))
    return out


def assert_states_close(got: dict, want: dict, *, exact: bool = False):
    assert set(got) == set(want)
    for name in want:
        g, w = got[name].float(), want[name].float()
        if exact:
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def ft_paths(pair, n):
    return [str(p) for p in pair[1][:n]]


def acm_lambdas(n_ft: int, seed: int = 0) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    return [{grp: float(0.3 + 1.2 * torch.rand((), generator=g)) for grp in groups()} for _ in range(n_ft)]


# ---------------------------------------------------------------------------------------------
# fixtures: tiny model families built once per module
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("llama"), "llama", n_ft=2)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("qwen2"), "qwen2", n_ft=2)


@pytest.fixture(scope="module")
def states(llama, qwen2):
    return {fam: (load_state(pair[0]), [load_state(p) for p in pair[1]]) for fam, pair in
            (("llama", llama), ("qwen2", qwen2))}


def _merge(pair, n_ft, out, **kw):
    lambdas = kw.pop("lambdas", None)
    force = kw.pop("force", False)
    return merge_models(str(pair[0]), ft_paths(pair, n_ft), out, MergeOptions(**kw), lambdas=lambdas,
                        force=force, show_progress=False)


# ---------------------------------------------------------------------------------------------
# correctness against the dense reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("n_ft", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_method_matches_dense_reference(family, n_ft, method, llama, qwen2, states, tmp_path):
    pair = {"llama": llama, "qwen2": qwen2}[family]
    base_sd, ft_sds = states[family]
    lams = None if method == "linear" else acm_lambdas(n_ft, seed=n_ft)
    report = _merge(pair, n_ft, tmp_path / "out", method=method, lambdas=lams, density=0.3, drop_rate=0.25, seed=3)
    want = reference(method, base_sd, ft_sds[:n_ft],
                     lams or [{g: 1.0 / n_ft for g in groups()}] * n_ft, density=0.3, drop=0.25, seed=3)
    assert_states_close(load_state(report.out_dir), want)
    assert report.num_tensors == len(base_sd) and report.num_shards == 1
    assert (report.out_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_small_chunks_and_sampled_thresholds_match_reference(method, llama, states, tmp_path, monkeypatch):
    """Chunk boundaries that cut rows, and the sampled-band threshold path, change nothing."""
    import acm.merging.kernels as mm

    monkeypatch.setattr(mm, "CPU_CHUNK", 97)
    monkeypatch.setattr(mm.selection, "_EXACT_BELOW", 64)
    monkeypatch.setattr(mm.selection, "_SAMPLE", 512)
    base_sd, ft_sds = states["llama"]
    lams = None if method == "linear" else acm_lambdas(2, seed=11)
    norm = method in ("dare_ties", "della")
    report = _merge(llama, 2, tmp_path / "out", method=method, lambdas=lams, density=0.15, drop_rate=0.4,
                    normalize=norm, gamma=0.03, epsilon=0.1)
    want = reference(method, base_sd, ft_sds, lams or [{g: 0.5 for g in groups()}] * 2, density=0.15, drop=0.4,
                     normalize=norm, gamma=0.03, epsilon=0.1)
    assert_states_close(load_state(report.out_dir), want)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_working_buffers_are_chunk_sized(method, llama, tmp_path, monkeypatch):
    """Memory flat like task arithmetic: on CPU no method keeps a whole tensor's float32 τ (TIES recomputes τ
    in its merge pass instead of storing it for the threshold); DARE-TIES keeps only a 1-byte keep mask."""
    import acm.merging.kernels as mm

    monkeypatch.setattr(mm, "CPU_CHUNK", 97)
    monkeypatch.setattr(mm.selection, "_EXACT_BELOW", 64)
    # tiny tensors: the whole tensor is the threshold sample (as a real sample is for a big one, relatively)
    monkeypatch.setattr(mm.selection, "_sample_slice", lambda n: slice(0, n, 1))
    monkeypatch.setattr(mm.selection, "_SIGMAS", 3.0)
    biggest = {torch.float32: 0, torch.bool: 0}
    real_get = mm.Workspace.get

    def recording_get(self, key, numel, dtype=torch.float32):
        biggest[dtype] = max(biggest[dtype], numel)
        return real_get(self, key, numel, dtype)

    monkeypatch.setattr(mm.Workspace, "get", recording_get)
    _merge(llama, 2, tmp_path / "out", method=method)
    assert 0 < biggest[torch.float32] <= 97
    assert set(biggest) == {torch.float32, torch.bool}
    if method == "dare_ties":
        assert biggest[torch.bool] == max(t.numel() for t in load_state(llama[0]).values())
    else:
        assert biggest[torch.bool] == 0


@pytest.mark.parametrize("miss", ["low", "high"])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sampled_band_miss_falls_back_to_exact_threshold(method, miss, llama, states, tmp_path, monkeypatch):
    """A band that misses the k-th largest (forced here; by chance it is ~never) must still give the exact
    trim: the engine then rebuilds that model's τ (same DARE mask) and selects over all of it."""
    import acm.merging.kernels as mm

    monkeypatch.setattr(mm, "CPU_CHUNK", 97)
    monkeypatch.setattr(mm.selection, "_EXACT_BELOW", 64)
    monkeypatch.setattr(mm.selection, "_SAMPLE", 512)
    calls = {"full": 0}
    real_full = mm.selection.MagnitudeTrim._full_threshold

    def counting_full(self, job, i, keep):
        calls["full"] += 1
        return real_full(self, job, i, keep)

    monkeypatch.setattr(mm.selection, "_band", lambda sample, n, k: (1e3, 2e3) if miss == "high" else (1e-30, 2e-30))
    monkeypatch.setattr(mm.selection.MagnitudeTrim, "_full_threshold", counting_full)
    base_sd, ft_sds = states["llama"]
    lams = acm_lambdas(2, seed=5)
    report = _merge(llama, 2, tmp_path / "out", method=method, lambdas=lams, density=0.15, drop_rate=0.4)
    assert calls["full"] > 0
    want = reference(method, base_sd, ft_sds, lams, density=0.15, drop=0.4)
    assert_states_close(load_state(report.out_dir), want)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_ties_normalize_matches_reference(method, llama, states, tmp_path):
    base_sd, ft_sds = states["llama"]
    lams = acm_lambdas(2, seed=5)
    report = _merge(llama, 2, tmp_path / "out", method=method, lambdas=lams, normalize=True, density=0.5)
    assert_states_close(load_state(report.out_dir),
                        reference(method, base_sd, ft_sds, lams, density=0.5, normalize=True))


def test_linear_weights_are_normalised(llama, states, tmp_path):
    base_sd, ft_sds = states["llama"]
    report = _merge(llama, 2, tmp_path / "out", method="linear", weights=[3.0, 1.0])
    assert_states_close(load_state(report.out_dir), reference("linear", base_sd, ft_sds, [], weights=[3.0, 1.0]))
    assert report.lambdas[0]["block.0"] == pytest.approx(0.75) and report.lambdas[1]["head"] == pytest.approx(0.25)


@pytest.mark.parametrize("method", TV_METHODS)
def test_acm_with_lambda_alpha_equals_plain_bitwise(method, llama, tmp_path):
    plain = _merge(llama, 2, tmp_path / "plain", method=method, alpha=0.7)
    acm = _merge(llama, 2, tmp_path / "acm", method=method, alpha=0.7,
                 lambdas=[{g: 0.7 for g in groups()} for _ in range(2)])
    assert_states_close(load_state(acm.out_dir), load_state(plain.out_dir), exact=True)
    assert (acm.out_dir / "model.safetensors").read_bytes() == (plain.out_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", TV_METHODS)
def test_lambda_zero_returns_the_base(method, llama, states, tmp_path):
    report = _merge(llama, 2, tmp_path / "out", method=method, alpha=0.0)
    assert_states_close(load_state(report.out_dir), states["llama"][0], exact=True)


def test_task_arithmetic_lambda_one_returns_the_fine_tuned_model(tmp_path):
    # bf16 in, bf16 out: θ₀ + (θ₁ − θ₀) is exact in float32 for bf16 values, so the merge is bit-exact.
    base = make_tiny_model(tmp_path / "b", "llama", seed=0, dtype=torch.bfloat16)
    ft = make_tiny_model(tmp_path / "f", "llama", seed=1, init_from=base, dtype=torch.bfloat16)
    report = merge_models(str(base), [str(ft)], tmp_path / "out", MergeOptions(alpha=1.0), show_progress=False)
    got = load_state(report.out_dir)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_states_close(got, load_state(ft), exact=True)
    assert json.loads((report.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_float32_task_arithmetic_lambda_one_is_the_fine_tuned_model(llama, states, tmp_path):
    report = _merge(llama, 1, tmp_path / "out", method="task_arithmetic", alpha=1.0)
    assert_states_close(load_state(report.out_dir), states["llama"][1][0])


def test_per_group_lambdas_are_applied_per_group(llama, states, tmp_path):
    base_sd, (ft_sd, _) = states["llama"]
    lam = {"embed": 0.0, "block.0": 1.0, "block.1": 0.5, "head": 2.0}
    got = load_state(_merge(llama, 1, tmp_path / "out", lambdas=[lam]).out_dir)
    for name in base_sd:
        want = base_sd[name] + lam[group_of(name)] * (ft_sd[name] - base_sd[name])
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj.weight"], ft_sd["model.layers.0.mlp.up_proj.weight"])
    assert not torch.allclose(got["lm_head.weight"], ft_sd["lm_head.weight"])


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "mistral"])
def test_other_families_merge_and_load(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = make_pair(tmp_path, family, n_ft=2)
    r = merge_models(str(base), [str(f) for f in fts], tmp_path / "out", MergeOptions(alpha=0.6),
                     show_progress=False)
    got, b = load_state(r.out_dir), load_state(base)
    f0, f1 = (load_state(f) for f in fts)
    for name in b:
        torch.testing.assert_close(got[name], b[name] + 0.6 * (f0[name] - b[name]) + 0.6 * (f1[name] - b[name]),
                                   rtol=1e-5, atol=1e-6)
    assert set(r.lambdas[0]) == {"embed", "block.0", "block.1", "head"}
    AutoModelForCausalLM.from_pretrained(r.out_dir)


def test_output_dtype_option(llama, tmp_path):
    report = _merge(llama, 2, tmp_path / "out", method="ties", dtype="float16")
    assert {t.dtype for t in load_state(report.out_dir).values()} == {torch.float16}
    assert json.loads((report.out_dir / "config.json").read_text())["dtype"] == "float16"


# ---------------------------------------------------------------------------------------------
# DARE, TIES trim scope
# ---------------------------------------------------------------------------------------------

def test_dare_reproducible_per_seed(llama, tmp_path):
    a = load_state(_merge(llama, 2, tmp_path / "a", method="dare_ta", seed=1).out_dir)
    b = load_state(_merge(llama, 2, tmp_path / "b", method="dare_ta", seed=1).out_dir)
    c = load_state(_merge(llama, 2, tmp_path / "c", method="dare_ta", seed=2).out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dare_drop_rate_zero_is_task_arithmetic(llama, tmp_path):
    a = load_state(_merge(llama, 2, tmp_path / "a", method="dare_ta", drop_rate=0.0).out_dir)
    b = load_state(_merge(llama, 2, tmp_path / "b", method="task_arithmetic").out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dare_drop_fraction_and_rescale():
    from acm.merging.kernels import dare_

    tau = torch.ones(200_000)
    out = dare_(tau.clone(), 0.3, 7, 0, "w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    # independent of call order / other tensors
    assert torch.equal(dare_(torch.ones(10), 0.5, 7, 1, "x"), dare_(torch.ones(10), 0.5, 7, 1, "x"))
    assert not torch.equal(dare_(torch.ones(64), 0.5, 7, 1, "x"), dare_(torch.ones(64), 0.5, 7, 2, "x"))


@pytest.mark.parametrize("p", [0.25, 0.3, 0.001, 0.999])
def test_dare_stream_is_chunking_independent_and_exact_rate(p):
    from acm.merging.kernels import DropStream

    n = 300_001
    whole = DropStream(p, 5, 1, "w", torch.device("cpu")).mask(torch.empty(n))
    stream = DropStream(p, 5, 1, "w", torch.device("cpu"))
    parts = [stream.mask(torch.empty(m)).clone() for m in (7, 1000, 13, 120_000, n - 121_020)]
    assert torch.equal(torch.cat(parts), whole)
    kept = whole.mean().item()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-6


def _constructed_pair(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """A fine-tuned model whose τ is large in embed + lm_head and tiny everywhere else."""
    import shutil

    from safetensors.torch import save_file

    base = make_tiny_model(tmp_path / "b", "llama", seed=0)
    ft = tmp_path / "f"
    shutil.copytree(base, ft)
    base_sd = load_state(base)
    g = torch.Generator().manual_seed(0)
    ft_sd = {}
    for name, t in base_sd.items():
        big = name in ("model.embed_tokens.weight", "lm_head.weight")
        scale = (1.0 + torch.rand(t.shape, generator=g)) if big else 1e-3 * torch.rand(t.shape, generator=g)
        sign = torch.where(torch.rand(t.shape, generator=g) < 0.5, -1.0, 1.0)
        ft_sd[name] = t + sign * scale
    save_file(ft_sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft, base_sd, ft_sd


def test_global_trim_differs_from_tensor_trim_as_specified(tmp_path):
    base, ft, base_sd, ft_sd = _constructed_pair(tmp_path)
    total = sum(t.numel() for t in base_sd.values())
    big = base_sd["model.embed_tokens.weight"].numel() + base_sd["lm_head.weight"].numel()
    density = 0.2
    assert big > density * total        # so the global top 20 % lies entirely in the two big tensors
    outs = {}
    for scope in ("tensor", "global"):
        r = merge_models(str(base), [str(ft)], tmp_path / scope,
                         MergeOptions(method="ties", density=density, trim_scope=scope), show_progress=False)
        outs[scope] = load_state(r.out_dir)
    kept = {s: {k: int(torch.count_nonzero(outs[s][k] - base_sd[k])) for k in base_sd} for s in outs}
    for name, t in base_sd.items():      # per tensor: every tensor keeps its own top 20 %
        assert kept["tensor"][name] == max(1, round(density * t.numel())), name
    # global: exactly the top 20 % over all tensors, none of it in the small-τ tensors
    assert sum(kept["global"].values()) == round(density * total)
    small = [k for k in base_sd if k not in ("model.embed_tokens.weight", "lm_head.weight")]
    assert all(kept["global"][k] == 0 for k in small)
    assert all(kept["tensor"][k] > 0 for k in small)
    want = reference("ties", base_sd, [ft_sd], [{g: 1.0 for g in groups()}], density=density, global_trim=True)
    assert_states_close(outs["global"], want)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_global_trim_matches_reference_and_keeps_exact_fraction(method, llama, states, tmp_path):
    base_sd, ft_sds = states["llama"]
    lams = acm_lambdas(2, seed=9)
    r = _merge(llama, 2, tmp_path / "out", method=method, trim_scope="global", density=0.1, lambdas=lams)
    got = load_state(r.out_dir)
    assert_states_close(got, reference(method, base_sd, ft_sds, lams, density=0.1, global_trim=True))
    # one model: TIES keeps exactly round(density · N) entries over all tensors
    r1 = _merge(llama, 1, tmp_path / "one", method="ties", trim_scope="global", density=0.1)
    changed = sum(int(torch.count_nonzero(load_state(r1.out_dir)[k] - base_sd[k])) for k in base_sd)
    assert changed == round(0.1 * sum(t.numel() for t in base_sd.values()))


def test_exact_threshold_selection_large_and_tied():
    from acm.merging.kernels import keep_count, kth_largest, trim

    g = torch.Generator().manual_seed(0)
    for a in (torch.randn(400_000, generator=g).abs(), torch.randint(0, 7, (300_000,), generator=g).float(),
              torch.zeros(300_000), torch.cat([torch.zeros(290_000), torch.rand(10_000, generator=g)])):
        for density in (0.01, 0.2, 0.9, 1.0):
            k = keep_count(a.numel(), density)
            assert kth_largest(a, k) == float(torch.sort(a, descending=True).values[k - 1])
    tau = torch.tensor([3.0, -3.0, 1.0, -2.0, 0.5])
    assert trim(tau.clone(), density=0.2).tolist() == [3.0, 0.0, 0.0, 0.0, 0.0]   # k = 1: the lower index wins the tie
    assert trim(tau.clone(), density=0.4).tolist() == [3.0, -3.0, 0.0, 0.0, 0.0]


def test_global_histogram_threshold_is_exact():
    from acm.merging import kernels as mm
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, generator=g).abs() * s for n, s in ((5000, 1.0), (3000, 1e-3), (7000, 10.0))]
    allv = torch.cat(parts)
    for density in (0.001, 0.2, 0.77):
        k = mm.keep_count(allv.numel(), density)
        hist = sum(mm.hist_high(p) for p in parts)
        bucket, rank = mm.locate(hist, k)
        low = sum(mm.hist_low(p, bucket) for p in parts)
        lo, _ = mm.locate(low, rank)
        assert mm.bits_to_float((bucket << 16) | lo) == float(torch.sort(allv, descending=True).values[k - 1])


# ---------------------------------------------------------------------------------------------
# vocabulary, sharding, loading
# ---------------------------------------------------------------------------------------------

def test_vocabulary_growth_taken_from_fine_tuned_and_reported(tmp_path):
    base = make_tiny_model(tmp_path / "b", "llama", seed=0)
    ft0 = make_tiny_model(tmp_path / "f0", "llama", seed=1, init_from=base, vocab_size=VOCAB_SIZE + 5)
    ft1 = make_tiny_model(tmp_path / "f1", "llama", seed=2, init_from=base, vocab_size=VOCAB_SIZE + 7)
    r = merge_models(str(base), [str(ft0), str(ft1)], tmp_path / "out", MergeOptions(alpha=0.5), show_progress=False)
    got, b, f0, f1 = load_state(r.out_dir), load_state(base), load_state(ft0), load_state(ft1)
    V = VOCAB_SIZE
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == V + 7
        want = b[name] + 0.5 * (f0[name][:V] - b[name]) + 0.5 * (f1[name][:V] - b[name])
        torch.testing.assert_close(got[name][:V], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[name][V:V + 5], f0[name][V:])        # first fine-tuned model that has them
        assert torch.equal(got[name][V + 5:], f1[name][V + 5:])
    assert json.loads((r.out_dir / "config.json").read_text())["vocab_size"] == V + 7
    notes = " ".join(r.vocab_notes)
    assert "f0" in notes and "f1" in notes and str(V + 7) in notes
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(r.out_dir)   # shapes agree with the config


@pytest.mark.parametrize("chunk", [None, 37])
def test_smaller_fine_tuned_vocabulary_counts_as_zero_task_vector(chunk, tmp_path, monkeypatch):
    import acm.merging.kernels as mm

    if chunk:
        monkeypatch.setattr(mm, "CPU_CHUNK", chunk)
    base = make_tiny_model(tmp_path / "b", "llama", seed=0)
    ft = make_tiny_model(tmp_path / "f", "llama", seed=1, init_from=base, vocab_size=VOCAB_SIZE - 3)
    r = merge_models(str(base), [str(ft)], tmp_path / "out", MergeOptions(alpha=1.0), show_progress=False)
    got, b, f = load_state(r.out_dir), load_state(base), load_state(ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == b[name].shape
        torch.testing.assert_close(got[name][:VOCAB_SIZE - 3], f[name])
        assert torch.equal(got[name][VOCAB_SIZE - 3:], b[name][VOCAB_SIZE - 3:])
    # linear: the missing rows are θᵢ = θ₀ there as well
    r = merge_models(str(base), [str(ft), str(ft)], tmp_path / "lin", MergeOptions(method="linear"),
                     show_progress=False)
    got = load_state(r.out_dir)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name][:VOCAB_SIZE - 3], f[name])
        assert torch.equal(got[name][VOCAB_SIZE - 3:], b[name][VOCAB_SIZE - 3:])


def test_sharded_inputs_and_output_load_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_tiny_model(tmp_path / "b", "qwen2", seed=0, max_shard_size="8KB")
    ft = make_tiny_model(tmp_path / "f", "qwen2", seed=1, init_from=base, max_shard_size="8KB")
    assert (base / "model.safetensors.index.json").is_file()
    r = merge_models(str(base), [str(ft)], tmp_path / "out", MergeOptions(method="ties", shard_size=4000),
                     show_progress=False)
    index = json.loads((r.out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(r.out_dir.glob("model-*-of-*.safetensors"))
    assert r.num_shards == len(shards) > 2 and not (r.out_dir / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == r.bytes_written
    assert not list(r.out_dir.glob("*.tmp"))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "README.md", "acm_recipe.json"):
        assert (r.out_dir / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(r.out_dir)
    tok = AutoTokenizer.from_pretrained(r.out_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert_states_close(load_state(r.out_dir), reference("ties", load_state(base), [load_state(ft)],
                                                        [{g: 1.0 for g in groups()}]))


def _mapped(paths) -> set[str]:
    names = {str(Path(p).resolve()) for p in paths}
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if line.split() and line.split()[-1] in names}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("method, extra", [("task_arithmetic", {}), ("ties", {}), ("ties", {"trim_scope": "global"}),
                                           ("dare_ties", {})])
def test_input_shards_are_unmapped_once_read(method, extra, tmp_path, monkeypatch):
    """Peak RSS must not grow with the model: while merging, each input keeps at most the shard being
    read mapped (a released shard is unmapped), none after the merge, and the result is unchanged."""
    import acm.checkpoints.shards
    from acm.checkpoints.models import resolve_model

    base = make_tiny_model(tmp_path / "b", "llama", seed=0, max_shard_size="8KB")
    ft = make_tiny_model(tmp_path / "f", "llama", seed=1, init_from=base, max_shard_size="8KB")
    srcs = [resolve_model(str(base)), resolve_model(str(ft))]
    files = [f for s in srcs for f in s.weight_files]
    assert len(srcs[0].weight_files) >= 4
    seen = {"open": 0, "mapped": 0, "calls": 0}
    real_add = acm.checkpoints.shards.ShardWriter.add

    def watching_add(self, name, tensor):
        seen["calls"] += 1
        seen["open"] = max(seen["open"], max(s.reader.open_files() for s in srcs))
        seen["mapped"] = max(seen["mapped"], len(_mapped(files)))
        return real_add(self, name, tensor)

    monkeypatch.setattr(acm.checkpoints.shards.ShardWriter, "add", watching_add)
    r = merge_models(srcs[0], [srcs[1]], tmp_path / "out", MergeOptions(method=method, **extra), show_progress=False)
    assert seen["calls"] == r.num_tensors
    assert seen["open"] <= 1 and seen["mapped"] <= 2 * 2      # the current shard (and the one before) per model
    assert all(s.reader.open_files() == 0 for s in srcs)
    import gc

    gc.collect()
    assert _mapped(files) == set()
    want = reference(method, load_state(base), [load_state(ft)], [{g: 1.0 for g in groups()}],
                     global_trim=extra.get("trim_scope") == "global")
    assert_states_close(load_state(r.out_dir), want)


# ---------------------------------------------------------------------------------------------
# output folder safety, errors
# ---------------------------------------------------------------------------------------------

def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_existing_output_refused_without_force_and_replaced_with_force(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker.txt").write_text("old")
    with pytest.raises(InputError, match="already exists.*--force"):
        _merge(llama, 1, out)
    assert (out / "marker.txt").is_file()
    r = _merge(llama, 1, out, force=True)
    assert r.out_dir == out.absolute() and (out / "model.safetensors").is_file()
    assert not (out / "marker.txt").exists()
    assert _leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(llama, tmp_path, monkeypatch):
    import acm.checkpoints.shards

    calls = {"n": 0}
    real_add = acm.checkpoints.shards.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real_add(self, name, tensor)

    monkeypatch.setattr(acm.checkpoints.shards.ShardWriter, "add", failing_add)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _merge(llama, 2, out, method="ties", shard_size=2000)
    assert not out.exists() and _leftovers(tmp_path) == []
    # with --force an existing folder survives a failed merge untouched
    out.mkdir()
    (out / "keep.txt").write_text("x")
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        _merge(llama, 2, out, force=True)
    assert (out / "keep.txt").read_text() == "x" and _leftovers(tmp_path) == []


def _broken_copy(src: Path, dst: Path, name: str, index, value: float) -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    sd = load_state(src)
    sd[name][index] = value
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_in_fine_tuned_tensor_is_named(tmp_path):
    base, (ft,) = make_pair(tmp_path, "llama", n_ft=1)
    bad = _broken_copy(ft, tmp_path / "bad-ft", "model.layers.1.self_attn.q_proj.weight", (2, 3), float("nan"))
    with pytest.raises(InputError, match=r"fine-tuned model .*bad-ft.*model\.layers\.1\.self_attn\.q_proj\.weight"):
        merge_models(str(base), [str(bad)], tmp_path / "out", MergeOptions(), show_progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# The engine checks the merged tensor, not every input (one pass instead of 1 + n); a broken input must
# still be named whatever the method, even where the method zeroes that entry (λ = 0, DARE drop, TIES
# trim or a losing sign), because 0·NaN and 0·Inf are NaN.
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("role", ["base", "ft2"])
@pytest.mark.parametrize("method, extra", [
    ("linear", {}), ("task_arithmetic", {}), ("task_arithmetic", {"alpha": 0.0}), ("ties", {}),
    ("ties", {"trim_scope": "global"}), ("ties", {"normalize": True}), ("dare_ta", {"drop_rate": 0.9}),
    ("dare_ties", {"drop_rate": 0.9}),
])
def test_nan_or_inf_in_any_input_is_named_for_every_method(value, role, method, extra, llama, tmp_path):
    base, fts = llama[0], list(llama[1])
    name = "model.embed_tokens.weight"
    if role == "base" and method == "linear":
        # linear is Σ wᵢθᵢ: the base's values are not an input (only its config/tokenizer), so a broken
        # base cannot reach the output and is not reported; the merge is exactly the fine-tuned average
        bad = _broken_copy(base, tmp_path / "bad-base", name, (5, 7), value)
        merge_models(str(bad), [str(f) for f in fts], tmp_path / "out", MergeOptions(method=method),
                     show_progress=False)
        got = load_state(tmp_path / "out")
        want = reference("linear", load_state(base), [load_state(f) for f in fts], [])
        assert_states_close(got, want)
        return
    if role == "base":
        base = _broken_copy(base, tmp_path / "bad-base", name, (5, 7), value)
        want = r"base model .*bad-base"
    else:
        fts[1] = _broken_copy(fts[1], tmp_path / "bad-ft", name, (5, 7), value)
        want = r"fine-tuned model .*bad-ft"
    with pytest.raises(InputError, match=want + r".*NaN/Inf.*model\.embed_tokens\.weight"):
        merge_models(str(base), [str(f) for f in fts], tmp_path / "out", MergeOptions(method=method, **extra),
                     show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_nan_in_large_tensor_with_sampled_threshold_is_named(method, tmp_path, monkeypatch):
    """Tensors above the exact-selection size take the sampled-band TIES path; a NaN must not slip through it."""
    import acm.merging.kernels as mm

    monkeypatch.setattr(mm.selection, "_EXACT_BELOW", 64)
    monkeypatch.setattr(mm.selection, "_SAMPLE", 256)
    base, (ft,) = make_pair(tmp_path, "llama", n_ft=1)
    bad = _broken_copy(ft, tmp_path / "bad-ft", "model.layers.0.mlp.up_proj.weight", (1, 1), float("nan"))
    with pytest.raises(InputError, match=r"bad-ft.*model\.layers\.0\.mlp\.up_proj\.weight"):
        merge_models(str(base), [str(bad)], tmp_path / "out", MergeOptions(method=method), show_progress=False)


def test_overflow_of_the_output_dtype_is_reported(tmp_path):
    """Finite inputs whose merge does not fit the output dtype: say so (and what to do), blame no model."""
    base, (ft,) = make_pair(tmp_path, "llama", n_ft=1)
    big = _broken_copy(ft, tmp_path / "big-ft", "model.layers.0.mlp.down_proj.weight", (0, 0), 60000.0)
    with pytest.raises(InputError, match=r"merged tensor model\.layers\.0\.mlp\.down_proj\.weight has values "
                                         r"outside the float16 range \(the inputs are finite\).*--dtype"):
        merge_models(str(base), [str(big)], tmp_path / "out", MergeOptions(alpha=2.0, dtype="float16"),
                     show_progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # the same merge in float32 is fine
    merge_models(str(base), [str(big)], tmp_path / "out32", MergeOptions(alpha=2.0, dtype="float32"),
                 show_progress=False)


def test_output_inside_an_input_is_refused(llama, tmp_path):
    with pytest.raises(InputError, match="input model"):
        _merge(llama, 1, llama[0], force=True)
    assert (llama[0] / "model.safetensors").is_file()


@pytest.mark.parametrize("kw, pattern", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(drop_rate=1.0), "drop rate"),
    (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(trim_scope="layer"), "trim scope"),
    (dict(method="slerp"), "unknown merge method"), (dict(shard_size="lots"), "shard size"),
    (dict(weights=[1.0, 1.0]), "linear only"), (dict(method="linear", weights=[1.0]), "weight"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_options_raise_input_error(kw, pattern, llama, tmp_path):
    with pytest.raises(InputError, match=pattern):
        _merge(llama, 2, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lambdas, pattern", [
    ([{"embed": 1.0}], "lack layer group"),
    ([{**{g: 1.0 for g in groups()}, "block.9": 1.0}], "unknown layer group"),
    ([{**{g: 1.0 for g in groups()}, "head": -1.0}], "finite and >= 0"),
    ([{g: 1.0 for g in groups()}] * 2, "2 fine-tuned"),
])
def test_bad_lambdas_raise_input_error(lambdas, pattern, llama, tmp_path):
    with pytest.raises(InputError, match=pattern):
        _merge(llama, 1, tmp_path / "out", lambdas=lambdas)


def test_linear_rejects_acm_lambdas(llama, tmp_path):
    with pytest.raises(InputError, match="linear"):
        _merge(llama, 1, tmp_path / "out", method="linear", lambdas=[{g: 1.0 for g in groups()}])


def test_cpu_thread_count_is_bounded_and_restored(llama, tmp_path, monkeypatch):
    import acm.merging.engine

    seen = []
    real = acm.merging.engine._Plan.merge_tensor

    def spy(self, name, out_dtype):
        seen.append(torch.get_num_threads())
        return real(self, name, out_dtype)

    monkeypatch.setattr(acm.merging.engine._Plan, "merge_tensor", spy)
    before = torch.get_num_threads()
    _merge(llama, 1, tmp_path / "a", threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    _merge(llama, 1, tmp_path / "b")
    assert set(seen) == {acm.merging.engine.default_cpu_threads()} and torch.get_num_threads() == before
    with pytest.raises(InputError, match="threads"):
        _merge(llama, 1, tmp_path / "c", threads=0)


def test_parse_size():
    from acm.checkpoints.shards import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size(1234) == 1234 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("10kb") == 10**4
    for bad in ("", "GB", "-1MB", 0, "2 parsecs"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_progress_callback_and_report(llama, tmp_path):
    seen = []
    r = merge_models(str(llama[0]), ft_paths(llama, 2), tmp_path / "out", MergeOptions(method="ties",
                     trim_scope="global"), progress=lambda f, d: seen.append((f, d)), show_progress=False)
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0 and all(isinstance(d, str) for _, d in seen)
    d = r.to_dict()
    assert json.loads(json.dumps(d))["num_tensors"] == r.num_tensors
    assert d["options"]["method"] == "ties" and d["lambdas"][0]["embed"] == 1.0


def test_repeated_merges_build_the_architecture_once(llama, tmp_path, monkeypatch):
    """The group map's meta model is cached per config (the app merges the same pair for many t); the result
    is unchanged, and another architecture still gets its own map."""
    import acm.checkpoints.grouping

    acm.checkpoints.grouping._STRUCTURE_CACHE.clear()
    calls = {"n": 0}
    real = acm.checkpoints.grouping.meta_model

    def counting(config, **kw):
        calls["n"] += 1
        return real(config, **kw)

    monkeypatch.setattr(acm.checkpoints.grouping, "meta_model", counting)
    a = _merge(llama, 2, tmp_path / "a", method="ties", lambdas=acm_lambdas(2))
    first = calls["n"]
    b = _merge(llama, 2, tmp_path / "b", method="ties", lambdas=acm_lambdas(2))
    # known families are grouped from their tensor names (no meta model at all); others build it once
    assert first <= 1 and calls["n"] == first
    assert_states_close(load_state(a.out_dir), load_state(b.out_dir), exact=True)
    other = make_pair(tmp_path / "q", "qwen2", n_ft=1)
    _merge(other, 1, tmp_path / "c")
    assert calls["n"] <= first + 1
