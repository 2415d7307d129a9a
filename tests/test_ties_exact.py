"""TIES keeps exactly k = round(density·n) entries, even on heavily tied bf16 task vectors.

Real bf16 checkpoints give task vectors with few distinct magnitudes, so thousands of entries
can share the threshold value. These tests build such task vectors on purpose and check, for
every trim scope, chunk size and selection path (sampled band, full selection), that the kept
count is exact and that the result equals a dense stable-sort reference (ties: lowest flat
index first) entry for entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acm.merging import kernels as mm
from acm.merging.engine import MergeOptions, merge_models
from tests.fixtures import make_tiny_model
from tests.test_merge import load_state, reference, top_k_mask


def tied_tau(n: int, seed: int, levels: int = 4) -> torch.Tensor:
    """A task vector whose magnitudes take ``levels`` values (multiples of 2^-8, as bf16 deltas do)."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.randint(1, levels + 1, (n,), generator=g).float() * 2.0 ** -8
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    tau = mags * signs
    tau[torch.rand(n, generator=g) < 0.05] = 0.0           # some exact zeros, as in real deltas
    return tau.to(torch.bfloat16).float()


def run_job(tau: torch.Tensor, density: float, chunk: int) -> torch.Tensor:
    """One model, λ = 1, zero base: the merged tensor is exactly the trimmed task vector."""
    base = torch.zeros_like(tau)
    out = torch.empty_like(tau)
    job = mm.TensorJob(base, [tau], mm.Workspace("cpu"), chunk=chunk)
    job.ties([1.0], out, density=density)
    return out


@pytest.mark.parametrize("n", [5_000, 300_001])                  # full selection / sampled band
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("chunk", [1 << 10, 12_345, mm.CPU_CHUNK])
def test_per_tensor_trim_keeps_exactly_k_on_tied_values(n, density, chunk):
    tau = tied_tau(n, seed=n + int(density * 100))
    k = mm.keep_count(n, density)
    threshold = float(torch.sort(tau.abs(), descending=True).values[k - 1])
    assert int((tau.abs() == threshold).sum()) > 100             # the case the issue is about: many ties
    got = run_job(tau, density, chunk)
    assert int(torch.count_nonzero(got)) == k
    want = torch.where(top_k_mask(tau, density), tau, torch.zeros_like(tau))
    assert torch.equal(got, want)                                # off and on the threshold alike


def test_tie_break_does_not_depend_on_chunking():
    tau = tied_tau(200_003, seed=7, levels=2)
    results = [run_job(tau, 0.3, chunk) for chunk in (257, 4096, 65_536, 1 << 20)]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_trim_spec_and_whole_tensor_trim():
    tau = torch.tensor([2.0, -2.0, 2.0, 1.0, -2.0, 0.0])
    spec = mm.exact_trim(tau, 2)
    assert spec == mm.TrimSpec(2.0, 2)
    assert mm.trim(tau.clone(), density=0.5).tolist() == [2.0, -2.0, 2.0, 0.0, 0.0, 0.0]
    assert mm.exact_trim(torch.tensor([3.0, 2.0, 1.0]), 2) == mm.TrimSpec(2.0, None)   # no tie: fast path
    assert mm.exact_trim(torch.tensor([0.0, 0.0, 1.0]), 2) == mm.TrimSpec(0.0)        # fewer non-zeros than k


# ------------------------------------------------------------------------------------------
# through the engine: bf16 checkpoints whose task vectors tie heavily, both trim scopes
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """A bf16 base and a fine-tuned model whose deltas take 3 magnitudes (exact in bf16)."""
    root = tmp_path_factory.mktemp("bf16ties")
    base = make_tiny_model(root / "base", "llama", seed=0, dtype=torch.bfloat16, hidden_size=32,
                           intermediate_size=64)
    ft = make_tiny_model(root / "ft", "llama", seed=1, dtype=torch.bfloat16, hidden_size=32,
                         intermediate_size=64)
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    new = {}
    for name, b in state.items():
        # base values on a coarse grid so that base + delta stays exact in bf16
        b32 = (b.float() * 64).round() / 64
        state[name] = b32.to(torch.bfloat16)
        delta = torch.randint(-3, 4, b.shape, generator=g).float() / 256
        new[name] = (b32 + delta).to(torch.bfloat16)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    save_file(new, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("chunk", [97, mm.CPU_CHUNK])
def test_engine_keeps_exactly_k_in_every_scope(bf16_pair, tmp_path, monkeypatch, method, scope, chunk):
    monkeypatch.setattr(mm, "CPU_CHUNK", chunk)
    monkeypatch.setattr(mm.selection, "_EXACT_BELOW", 64)    # small tensors also take the band path
    monkeypatch.setattr(mm.selection, "_SAMPLE", 512)
    base, ft = bf16_pair
    density, drop = 0.2, (0.3 if method == "dare_ties" else 0.0)
    report = merge_models(str(base), [str(ft)], tmp_path / "out",
                          MergeOptions(method=method, density=density, drop_rate=drop, trim_scope=scope,
                                       dtype="float32", seed=4), show_progress=False)
    got = load_state(report.out_dir)
    base_sd, ft_sd = load_state(base), load_state(ft)
    want = reference(method, base_sd, [ft_sd], [{g: 1.0 for g in report.lambdas[0]}], density=density,
                     drop=drop, seed=4, global_trim=scope == "global")
    for name, b in base_sd.items():
        w = want[name].float()
        # the same entries survive; values equal (TIES, λ = 1) or equal to float32 rounding (DARE's 1/(1−p))
        assert torch.equal(got[name] != b.float(), w != b.float()), name
        if method == "ties":
            assert torch.equal(got[name], w), name
        else:
            torch.testing.assert_close(got[name], w, rtol=1e-6, atol=1e-7)
    changed = {k: int(torch.count_nonzero(got[k] - base_sd[k].float())) for k in base_sd}
    if method == "ties":
        if scope == "global":
            assert sum(changed.values()) == mm.keep_count(sum(t.numel() for t in base_sd.values()), density)
        else:
            for name, t in base_sd.items():
                nonzero = int(torch.count_nonzero(ft_sd[name].float() - t.float()))
                assert changed[name] == min(mm.keep_count(t.numel(), density), nonzero), name
    recipe = json.loads((Path(report.out_dir) / "acm_recipe.json").read_text())
    assert recipe["options"]["density"] == density
