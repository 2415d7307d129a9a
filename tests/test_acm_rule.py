"""The paper's rule (arXiv 2505.14009, Eq. 2–3) against an independent reference.

The reference below re-implements the public derivative of the authors' code from its description,
sharing nothing with the library but the token ids the analysis says it fed (``--save-calibration``):
hooks at the embedding output, each block's ``mlp.down_proj`` output, ``model.norm`` output and
``lm_head`` output; each sequence run alone; scikit-learn's ``mutual_info_score`` of the flattened bf16
values as labels; λ = 1 − meanᵢ σ(t·(MIᵢ − maxᵢ MIᵢ)). Then the merges: Task Arithmetic must equal
θ₀ + (1/N)·Σλτ, TIES must weight each task vector by λ before the sign election, and the merged-delta
setting must equal base + λ·(merged − base).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import mutual_info_score

from acm.cli import main
from tests.fixtures import make_pair, write_calibration

# The reference hands float activations to scikit-learn as labels, exactly as the derivative does.
pytestmark = pytest.mark.filterwarnings("ignore:Clustering metrics expects discrete values:UserWarning")


def reference_lambdas(base: str, ft: str, sequences: list[list[int]], t: float) -> list[float]:
    """λ per activation point (embed, each block's down_proj, norm, lm_head) as the derivative computes it."""
    from transformers import AutoModelForCausalLM

    def capture(path: str) -> list[list[np.ndarray]]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        mods = [model.model.embed_tokens, *(b.mlp.down_proj for b in model.model.layers), model.model.norm,
                model.lm_head]
        per_seq: list[list[np.ndarray]] = []
        acts: list[np.ndarray] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(
            out.detach().to(torch.bfloat16).float().reshape(-1).numpy())) for m in mods]
        with torch.no_grad():
            for ids in sequences:                     # each sequence alone: no padding anywhere
                acts.clear()
                model(input_ids=torch.tensor([ids]))
                per_seq.append(list(acts))
        for h in hooks:
            h.remove()
        return per_seq

    a0, a1 = capture(base), capture(ft)
    mi = np.array([[mutual_info_score(x, y) for x, y in zip(s0, s1)] for s0, s1 in zip(a0, a1)]).T  # [points, seqs]
    sig = 1.0 / (1.0 + np.exp(-t * (mi - mi.max(axis=1, keepdims=True))))
    return list(1.0 - sig.mean(axis=1))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _lambda_key(name: str) -> str:
    """λ key of a llama tensor: block k, embed, final norm, head."""
    if name.startswith("model.layers."):
        return f"block.{name.split('.')[2]}"
    return {"model.embed_tokens.weight": "embed", "model.norm.weight": "head.norm", "lm_head.weight": "head"}[name]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two fine-tuned models, an analysis with every value (no cap), one sequence per forward pass."""
    root = tmp_path_factory.mktemp("acm_rule")
    base, fts = make_pair(root, "llama", n_ft=2)
    cal = write_calibration(root / "cal.jsonl", n=10)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["analyze", "--base", str(base), *sum((["--ft", str(f)] for f in fts), []), "--calibration", str(cal),
                "--samples", "6", "--max-tokens", "24", "--batch-size", "1", "--mi-max-values", "0",
                "--out", str(root / "a.json"), "--save-calibration", str(root / "fed.jsonl")]
        assert main(args) == 0
    finally:
        torch.set_num_threads(old)
    fed = [json.loads(line) for line in (root / "fed.jsonl").read_text().splitlines()]
    return {"root": root, "base": str(base), "fts": [str(f) for f in fts], "analysis": root / "a.json", "fed": fed}


def test_saved_calibration_is_what_the_models_were_fed(setup):
    from acm.activations.result import AnalysisResult

    a = AnalysisResult.load(setup["analysis"])
    fed = setup["fed"]
    assert len(fed) == 6 and all(isinstance(r["text"], str) and r["input_ids"] for r in fed)
    assert [len(r["input_ids"]) for r in fed] == a.sample_info["tokens"]     # real tokens only, no padding
    assert all(isinstance(i, int) for r in fed for i in r["input_ids"])


@pytest.mark.parametrize("t", [-1.0, 0.7, 2.0])
def test_lambdas_equal_the_independent_reference(setup, t, capsys, one_torch_thread):
    sequences = [r["input_ids"] for r in setup["fed"]]
    assert main(["coefficients", "--analysis", str(setup["analysis"]), "--rule", "acm", "--t", str(t)]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["rule"] == "acm" and table["t"] == t
    for i, ft in enumerate(setup["fts"]):
        expect = reference_lambdas(setup["base"], ft, sequences, t)
        got = [g["lambda"] for g in table["models"][i]["groups"]]
        assert [g["name"] for g in table["models"][i]["groups"]] == ["embed", "block.0", "block.1", "head.norm", "head"]
        assert got == pytest.approx(expect, abs=1e-9)
        if t > 0:
            assert all(0.5 <= x < 1 for x in got)
        else:
            assert all(0 < x <= 0.5 for x in got)


def _lambdas(analysis: Path, t: float) -> list[dict[str, float]]:
    from acm.activations.result import AnalysisResult
    from acm.rules.coefficients import compute

    return compute(AnalysisResult.load(analysis), "acm", t).by_model()


def test_task_arithmetic_is_base_plus_mean_of_lambda_weighted_task_vectors(setup, tmp_path):
    out = tmp_path / "ta"
    assert main(["merge", "--base", setup["base"], *sum((["--ft", f] for f in setup["fts"]), []),
                 "--acm", str(setup["analysis"]), "--rule", "acm", "--t", "0.7", "--method", "task_arithmetic",
                 "--alpha", "0.3", "--out", str(out)]) == 0          # α plays no part in Eq. 3
    lam = _lambdas(setup["analysis"], 0.7)
    b, fts, m = _tensors(Path(setup["base"])), [_tensors(Path(f)) for f in setup["fts"]], _tensors(out)
    assert set(m) == set(b)
    for name, tb in b.items():
        key = _lambda_key(name)
        expect = tb + sum(lam[i][key] * (f[name] - tb) for i, f in enumerate(fts)) / len(fts)
        torch.testing.assert_close(m[name], expect, rtol=1e-6, atol=1e-7)
    rec = json.loads((out / "acm_recipe.json").read_text())
    entry = rec["acm_analysis"]
    assert entry["rule"] == "acm" and entry["t"] == 0.7 and entry["scale"] == 0.5
    assert entry["against"] == "fine-tuned" and entry["applies"] == "task-vectors"
    assert rec["lambdas"][0]["lambda"]["head.norm"] == pytest.approx(lam[0]["head.norm"] / 2)


def test_ties_weights_each_task_vector_by_lambda_before_the_sign_election(setup, tmp_path):
    out = tmp_path / "ties"
    assert main(["merge", "--base", setup["base"], *sum((["--ft", f] for f in setup["fts"]), []),
                 "--acm", str(setup["analysis"]), "--t", "2", "--method", "ties", "--density", "1",
                 "--out", str(out)]) == 0
    lam = _lambdas(setup["analysis"], 2.0)
    b, fts, m = _tensors(Path(setup["base"])), [_tensors(Path(f)) for f in setup["fts"]], _tensors(out)
    differs = 0
    for name, tb in b.items():
        key = _lambda_key(name)
        taus = [f[name] - tb for f in fts]
        weighted = [lam[i][key] / len(fts) * tau for i, tau in enumerate(taus)]
        before = torch.sign(sum(weighted))                        # λ before the election (the paper's plug-in)
        after = torch.sign(sum(taus))                             # an election that ignores λ
        expect = tb + sum(torch.where(torch.sign(w) == before, w, torch.zeros_like(w)) for w in weighted)
        torch.testing.assert_close(m[name], expect, rtol=1e-6, atol=1e-7)
        differs += int((before != after).sum())
    assert differs > 0          # the pair has entries where λ changes the elected sign: the test can fail


@pytest.mark.parametrize("against", ["fine-tuned", "merged"])
def test_merged_delta_is_base_plus_lambda_times_the_plain_merge_delta(setup, tmp_path, against):
    from acm.merging.engine import MergeOptions, merge_models

    out = tmp_path / "md"
    extra = (["--acm", str(setup["analysis"])] if against == "fine-tuned"
             else ["--calibration", str(setup["root"] / "cal.jsonl"), "--samples", "5", "--max-tokens", "16"])
    assert main(["merge", "--base", setup["base"], *sum((["--ft", f] for f in setup["fts"]), []), *extra,
                 "--t", "0.7", "--against", against, "--applies", "merged-delta", "--method", "ties",
                 "--alpha", "0.8", "--density", "0.5", "--out", str(out)]) == 0
    plain = tmp_path / "plain"
    merge_models(setup["base"], setup["fts"], plain, MergeOptions(method="ties", alpha=0.8, density=0.5),
                 show_progress=False)
    rec = json.loads((out / "acm_recipe.json").read_text())
    lam = rec["lambdas"][0]["lambda"]
    if against == "fine-tuned":          # one λ per key: the mean over the fine-tuned models
        by_model = _lambdas(setup["analysis"], 0.7)
        assert lam == pytest.approx({k: np.mean([d[k] for d in by_model]) for k in by_model[0]})
    assert rec["acm_analysis"]["against"] == against and rec["method"] == "ties"
    assert str(tmp_path) not in json.dumps(rec)                   # no temp path in the record
    b, p, m = _tensors(Path(setup["base"])), _tensors(plain), _tensors(out)
    for name, tb in b.items():
        torch.testing.assert_close(m[name], tb + lam[_lambda_key(name)] * (p[name] - tb), rtol=1e-5, atol=1e-6)
    assert [x.name for x in tmp_path.iterdir()] != [] and not list(out.glob("stage*"))


def test_old_analysis_without_per_sample_mi_says_how_to_rerun(tmp_path, capsys):
    old = Path(__file__).parent / "data" / "analysis_v1_nmi_only.json"
    assert main(["coefficients", "--analysis", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no per-sample MI" in err and "acm analyze" in err and "--rule softmax" in err
    assert main(["coefficients", "--analysis", str(old), "--rule", "softmax", "--t", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "softmax"


def test_sigmoid_of_translated_mi_hand_computed():
    from acm.rules import acm_lambdas

    mi = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = [1 - (sig(-1.4) + sig(-0.7) + sig(0.0)) / 3, 0.5]
    assert acm_lambdas(mi, 0.7) == pytest.approx(expect, rel=1e-12)
    grid = acm_lambdas(mi, [-1.0, 0.0, 0.7])                      # vectorised over t (the live curve)
    assert grid.shape == (3, 2) and grid[1] == pytest.approx([0.5, 0.5]) and grid[2] == pytest.approx(expect)
    assert np.all(acm_lambdas(mi * 1e6, 3.0) >= 0.5) and np.all(acm_lambdas(mi * 1e6, -3.0) <= 0.5)   # no overflow
