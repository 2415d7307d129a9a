"""Activation capture + NMI on tiny fixture models (acm.activations.analysis)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import acm.activations.analysis as analysis_mod
from acm.activations import capture as capture_mod
from acm.activations.analysis import analyze
from acm.activations.calibration import pad_batches
from acm.activations.result import AnalysisResult, ModelNMI
from acm.checkpoints.grouping import group_names
from acm.errors import CompatibilityError, InputError, OutOfMemoryAdvice
from tests.fixtures import group_rows, make_pair, make_tiny_model, write_calibration


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add synchronisation (10x slower on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


FAST = dict(samples=10, clusters=3, max_tokens=40, batch_size=4, show_progress=False)
TEXTS = [f"what is {i} plus {i * 3}? the answer is {i * 4}." for i in range(10)]
NO_SELECT = {**FAST, "samples": len(TEXTS)}          # all texts kept: no k-means / embedding pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    llama_base, llama_fts = make_pair(root, "llama", n_ft=2)
    qwen_base, qwen_fts = make_pair(root, "qwen2", n_ft=1, num_hidden_layers=3)
    cal = write_calibration(root / "cal.jsonl", n=30)
    return {"root": root, "llama": (str(llama_base), [str(p) for p in llama_fts]),
            "qwen2": (str(qwen_base), [str(p) for p in qwen_fts]), "cal": str(cal)}


@pytest.fixture(scope="module")
def llama_result(world):
    base, fts = world["llama"]
    return analyze(base, fts + [base], world["cal"], **FAST)


def test_groups_in_network_order_and_nmi_in_unit_interval(llama_result, world):
    r = llama_result
    assert r.groups == group_names(2) == ["embed", "block.0", "block.1", "head"]
    assert [m.model for m in r.models] == world["llama"][1] + [world["llama"][0]]
    nmi = r.nmi_matrix()
    assert nmi.shape == (3, 4)
    assert np.all(np.isfinite(nmi)) and np.all((nmi >= 0) & (nmi <= 1))
    for m in r.models:
        assert all(math.isfinite(v) and v >= 0 for v in m.mi)
        assert len(m.entropy_base) == len(m.entropy_ft) == 4


def test_ft_identical_to_base_gives_nmi_one(llama_result):
    same = llama_result.models[-1]
    assert np.allclose(same.nmi, 1.0, atol=1e-9)
    for real_ft in llama_result.models[:2]:
        assert max(real_ft.nmi) < 0.99            # noise-perturbed copies really differ


def test_identical_ft_stays_at_one_when_ranges_come_from_a_subsample(world, monkeypatch):
    """Large activations set their ranges from a random subsample; base and fine-tuned use the
    same positions, so an unchanged model still gets identical ranges and NMI exactly 1."""
    import acm.activations.mi

    monkeypatch.setattr(acm.activations.mi, "QUANTILE_SAMPLE", 64)
    base, _ = world["llama"]
    r = analyze(base, [base], TEXTS, **NO_SELECT)
    assert np.allclose(r.models[0].nmi, 1.0, atol=1e-9)


def test_provenance(llama_result, world):
    p = llama_result.provenance
    assert p["models"]["base"]["model"] == world["llama"][0]
    assert [m["model"] for m in p["models"]["fine_tuned"]][:2] == world["llama"][1]
    cal = p["calibration"]
    assert cal["source"] == world["cal"] and cal["available"] == 30 and cal["samples"] == 10
    assert cal["tokens"] > 0 and cal["chat_template"] is True
    for key in ("bins", "seed", "max_tokens", "clusters", "fraction", "version", "device", "dtype", "seconds"):
        assert key in p, key
    assert p["bins"] == 64 and p["device"] == "cpu" and p["dtype"] == "float32" and p["head_vocab_subset"] > 0
    assert p["group_tensors"]["embed"] == ["model.embed_tokens.weight"]
    assert set(p["group_tensors"]["head"]) == {"lm_head.weight", "model.norm.weight"}


def test_json_round_trip(llama_result, tmp_path):
    path = llama_result.save(tmp_path / "a.json")
    loaded = AnalysisResult.load(path)
    assert loaded.groups == llama_result.groups
    assert np.array_equal(loaded.nmi_matrix(), llama_result.nmi_matrix())
    assert loaded.to_dict() == json.loads(json.dumps(llama_result.to_dict()))
    assert AnalysisResult.from_json(llama_result.to_json()).models[0].mi == llama_result.models[0].mi
    llama_result.save(path)                          # overwriting is allowed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_invalid_analysis_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        AnalysisResult.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        AnalysisResult.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"groups": ["embed"], "models": [{"model": "m", "nmi": [1.5]}]}))
    with pytest.raises(InputError, match="invalid NMI"):
        AnalysisResult.load(tmp_path / "y.json")
    ok = AnalysisResult(groups=["embed", "head"], models=[ModelNMI("m", [0.2, 0.3], [0.1, 0.1])])
    assert AnalysisResult.from_dict(ok.to_dict()).nmi_matrix().tolist() == [[0.2, 0.3]]


def test_qwen2_single_ft(world):
    base, fts = world["qwen2"]
    r = analyze(base, fts, TEXTS, **NO_SELECT)
    assert r.groups == ["embed", "block.0", "block.1", "block.2", "head"]
    assert len(r.models) == 1 and r.models[0].model == fts[0]
    nmi = r.nmi_matrix()
    assert np.all(np.isfinite(nmi)) and np.all((nmi > 0) & (nmi < 1))


def test_gpt2_tied_embeddings(tmp_path):
    base, fts = make_pair(tmp_path, "gpt2", n_ft=1, tie_word_embeddings=True)
    cal = write_calibration(tmp_path / "c.jsonl", n=6)
    r = analyze(str(base), [str(fts[0]), str(base)], str(cal), samples=6, max_tokens=24, show_progress=False)
    assert r.groups == ["embed", "block.0", "block.1", "head"]
    assert np.allclose(r.models[1].nmi, 1.0) and np.all(np.asarray(r.models[0].nmi) < 1.0)


def test_deterministic_per_seed(world, llama_result):
    base, fts = world["llama"]
    again = analyze(base, fts + [base], world["cal"], **FAST)
    assert np.array_equal(again.nmi_matrix(), llama_result.nmi_matrix())
    other = analyze(base, fts[:1], world["cal"], **{**FAST, "seed": 5})
    assert other.provenance["seed"] == 5
    assert not np.array_equal(other.nmi_matrix()[0], llama_result.nmi_matrix()[0])


def test_batch_size_only_matters_through_the_first_batch_ranges(world, monkeypatch):
    """Histograms add up exactly over batches; what batch size changes is the first batch, which
    sets the bin ranges. With the ranges pinned to the same values, batch sizes 3 and 10 give
    identical counts up to float round-off of differently-shaped matmuls (a value on a bin edge
    may flip), so NMI agrees to ~1e-3; with free ranges it still agrees to a few 1e-2."""
    base, fts = world["llama"]
    ref = analyze(base, fts[:1], TEXTS, **{**NO_SELECT, "batch_size": 10})      # all samples: one batch
    free = analyze(base, fts[:1], TEXTS, **{**NO_SELECT, "batch_size": 2})
    assert np.allclose(free.models[0].nmi, ref.models[0].nmi, atol=0.05)

    base_ranges = ref.provenance["ranges"]["base"]
    ft_ranges = ref.provenance["ranges"]["fine_tuned"][0]
    original = analysis_mod.StreamingMI

    def pinned(*args, **kwargs):
        est = original(*args, **kwargs)
        for g, (xr, yr) in enumerate(zip(base_ranges, ft_ranges)):
            est.set_range(g, tuple(xr), tuple(yr))
        return est

    monkeypatch.setattr(analysis_mod, "StreamingMI", pinned)
    monkeypatch.setattr(capture_mod, "robust_range", lambda *a, **k: pytest.fail("ranges must stay pinned"))
    original_bin = capture_mod.GroupCapture._bin

    def _bin(self, group, *args, **kwargs):            # the capture keeps the base range too
        if self.base_range[group] is None:
            self.base_range[group] = tuple(base_ranges[group])
        return original_bin(self, group, *args, **kwargs)

    monkeypatch.setattr(capture_mod.GroupCapture, "_bin", _bin)
    r = analyze(base, fts[:1], TEXTS, **{**NO_SELECT, "batch_size": 3})
    assert np.allclose(r.models[0].nmi, ref.models[0].nmi, atol=2e-3)


def test_left_padding_matches_right_padding(world):
    base, fts = world["llama"]
    right = analyze(base, fts[:1], TEXTS, **NO_SELECT)
    left = analyze(base, fts[:1], TEXTS, padding_side="left", **NO_SELECT)
    assert np.allclose(left.models[0].nmi, right.models[0].nmi, atol=0.03)


def test_progress_callback(world):
    base, fts = world["llama"]
    seen = []
    analyze(base, fts[:1], TEXTS, progress=lambda f, msg: seen.append((f, msg)), **NO_SELECT)
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and all(0 <= f <= 1 for f in fracs)
    assert any("batch" in msg for _, msg in seen)


def test_out_of_memory_becomes_advice(world, monkeypatch):
    base, fts = world["llama"]

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(capture_mod, "bin_indices", boom)
    with pytest.raises(OutOfMemoryAdvice) as e:
        analyze(base, fts[:1], TEXTS, **NO_SELECT)
    msg = str(e.value)
    assert "--batch-size" in msg and "--samples" in msg and "--max-tokens" in msg and "\n" not in msg


def test_incompatible_models_fail_before_loading_weights(world, tmp_path, monkeypatch):
    base, _ = world["llama"]
    other = make_tiny_model(tmp_path / "wide", "llama", hidden_size=32, intermediate_size=64)
    monkeypatch.setattr(analysis_mod, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(CompatibilityError, match="hidden size"):
        analyze(base, [str(other)], world["cal"], **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bins=1), "bins"), (dict(bins=2000), "bins"), (dict(batch_size=0), "batch_size"),
    (dict(max_tokens=0), "max_tokens"), (dict(fraction=0.0), "fraction"), (dict(samples=0), "samples"),
    (dict(clusters=0), "clusters"), (dict(padding_side="middle"), "padding_side"),
])
def test_invalid_settings_fail_fast(world, kwargs, match):
    base, fts = world["llama"]
    args = {**FAST, **kwargs}
    with pytest.raises(InputError, match=match):
        analyze(base, fts, world["cal"], **args)


def test_calibration_errors_surface_before_loading(world, tmp_path, monkeypatch):
    base, fts = world["llama"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    monkeypatch.setattr(analysis_mod, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(InputError, match="empty"):
        analyze(base, fts, str(empty), **FAST)


# ============================================================ one model resident at a time


def _reference_nmi(base: str, ft: str, texts: list[str], *, bins: int = 64, max_tokens: int = 40,
                   batch_size: int = 4, seed: int = 0) -> np.ndarray:
    """The estimator's definition, computed the direct way: both models loaded together, every
    real (token, feature) pair of every batch kept, ranges from the first batch's quantiles."""
    from acm.activations.calibration import encode
    from acm.activations.mi import StreamingMI, robust_range
    from acm.checkpoints.grouping import find_group_modules
    from acm.checkpoints.models import load_causal_lm, resolve_model

    (mb, tok), (mf, _) = [load_causal_lm(resolve_model(p), device="cpu") for p in (base, ft)]
    ids = [x for x in encode(texts, tok, max_tokens=max_tokens) if x]
    head_ids = capture_mod.head_ids(int(mb.get_output_embeddings().weight.shape[0]), seed)
    n_groups = find_group_modules(mb).num_layers + 2
    est = StreamingMI(n_groups, bins=bins)

    for b, (inp, mask) in enumerate(pad_batches(ids, batch_size, tok.pad_token_id)):
        xs, ys = group_rows(mb, inp, mask, head_ids), group_rows(mf, inp, mask, head_ids)
        xs[-1], ys[-1] = xs[-1].t(), ys[-1].t()          # the head's values go in as [ids, tokens]
        for g, (x, y) in enumerate(zip(xs, ys)):
            if b == 0:
                est.set_range(g, robust_range(x, seed=seed + g), robust_range(y, seed=seed + g))
            est.update(g, x, y)
    return est.nmi()


def test_one_at_a_time_equals_the_full_estimator(world):
    """Below the pair budget every pair is kept: the NMI is the full estimator's, to round-off
    (measured: bit-identical, also to the all-models-at-once code this replaced)."""
    base, fts = world["qwen2"]
    r = analyze(base, fts, TEXTS, **NO_SELECT)
    assert r.provenance["subsampled_groups"] == []
    ref = _reference_nmi(base, fts[0], TEXTS, max_tokens=NO_SELECT["max_tokens"], batch_size=NO_SELECT["batch_size"])
    assert np.allclose(r.models[0].nmi, ref, rtol=0, atol=1e-12)


def test_only_one_model_is_resident_at_a_time(world, monkeypatch):
    """Each model is released (garbage) before the next one loads."""
    import weakref

    base, fts = world["llama"]
    alive: list[weakref.ref] = []
    real_load = analysis_mod.load_causal_lm

    def load(*a, **k):
        assert all(ref() is None for ref in alive), "a previous model (or one of its weights) is still in memory"
        model, tok = real_load(*a, **k)
        alive.extend(weakref.ref(x) for x in (model, model.get_input_embeddings().weight,
                                              model.get_output_embeddings().weight))
        return model, tok

    monkeypatch.setattr(analysis_mod, "load_causal_lm", load)
    r = analyze(base, fts, TEXTS, **NO_SELECT)
    assert len(alive) == 9 and all(ref() is None for ref in alive)
    assert [p["model"] for p in r.provenance["passes"]] == [base, *fts]


def test_subsampled_pairs_agree_with_every_pair_on_the_demo_pair():
    """Above the budget a seeded sample of pairs is used. Demo pair, 40 bundled prompts (1,303
    tokens: 125k pairs per block, 645k for the head): measured max |ΔNMI| over all 8 groups
    against every pair, seeds 0/1/2: 0.0043 / 0.0056 / 0.0066 at a budget of 2^16, 0.015–0.019
    at 2^14, 0.050–0.058 at 2^12 — the (B−1)²/2N small-sample bias of a B×B histogram. The
    default budget 2^22 puts that bias near 10⁻⁴."""
    from acm.activations.calibration import bundled_path, load_texts

    demo = bundled_path().parent.parent / "demo-models"
    if not (demo / "tiny-math-base").is_dir():
        pytest.skip("bundled demo models not built")
    texts = load_texts("bundled")[:40]
    kw = {"samples": 40, "max_tokens": 64, "batch_size": 8, "show_progress": False}
    base, ft = str(demo / "tiny-math-base"), str(demo / "tiny-math-long")
    full = analyze(base, [ft], texts, **kw)
    sub = analyze(base, [ft], texts, pair_budget=1 << 16, **kw)
    assert full.provenance["subsampled_groups"] == []
    assert sub.provenance["subsampled_groups"] == sub.groups
    assert sub.provenance["pairs_per_group"] == [pytest.approx(1 << 16, abs=8)] * len(sub.groups)
    assert sub.provenance["ranges"] == full.provenance["ranges"]        # ranges exactly as before
    assert np.abs(np.array(sub.models[0].nmi) - np.array(full.models[0].nmi)).max() < 0.012


def test_subsampled_pairs_line_up_across_passes(world):
    """Base and fine-tuned passes draw the same positions: an unchanged model keeps NMI 1."""
    base, fts = world["llama"]
    r = analyze(base, [base, fts[0]], TEXTS, pair_budget=500, **NO_SELECT)
    assert r.provenance["subsampled_groups"] == r.groups
    assert np.allclose(r.models[0].nmi, 1.0, atol=1e-9)
    assert max(r.models[1].nmi) < 0.99
    again = analyze(base, [fts[0]], TEXTS, pair_budget=500, **NO_SELECT)
    assert np.array_equal(again.models[0].nmi, r.models[1].nmi)          # seeded: reproducible


def test_memory_in_provenance(llama_result):
    mem = llama_result.provenance["memory"]
    assert mem["peak_rss_bytes"] > 0 and mem["cuda_max_allocated_bytes"] is None
    assert mem["histogram_bytes"] == 3 * 4 * 64 * 64 * 8                 # 3 models × 4 groups × B² int64
    tokens = llama_result.provenance["calibration"]["tokens"]
    assert 0 < mem["stored_base_bins_bytes"] <= 4 * tokens * 4096          # uint8 bins, ≤ 4096 per token
    assert mem["estimator_bytes"] == mem["histogram_bytes"] + mem["stored_base_bins_bytes"]
    assert llama_result.provenance["pair_budget"] == analysis_mod.DEFAULT_PAIR_BUDGET


@pytest.mark.parametrize("budget", [0, -5, 2.5, True])
def test_invalid_pair_budget(world, budget):
    base, fts = world["llama"]
    with pytest.raises(InputError, match="pair_budget"):
        analyze(base, fts, TEXTS, pair_budget=budget, **NO_SELECT)
