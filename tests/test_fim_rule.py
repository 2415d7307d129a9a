"""The fim rule (a reading of FIM-Merging, arXiv 2603.21705) against independent references.

The references share nothing with the library but the written formulas (docs/formulas.md "The fim rule"):
the Fisher per λ key is computed densely — ``torch.autograd.grad`` of each random-token sequence's loss
w.r.t. every parameter at once, squared, averaged over sequences and the key's parameters — and the α
are re-derived from the formula with plain numpy. Then a merge with the rule must reload with
transformers and generate, and the CLI paths (analyze, coefficients, merge, bad input) work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acm.cli import main
from tests.fixtures import make_pair
from tests.standins import build_pair


def dense_fisher(path: str, sequences: int, length: int, seed: int) -> dict[str, float]:
    """F per key: autograd over the whole model per sequence, squared gradients averaged (no hooks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = min(len(AutoTokenizer.from_pretrained(path)), model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))
    named = dict(model.named_parameters())
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    for s in range(sequences):
        logits = model(input_ids=ids[s:s + 1]).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[s, 1:])
        grads = torch.autograd.grad(loss, list(named.values()))
        for n, g in zip(named, grads):
            sq[n] += g.double() ** 2
    layers = model.config.num_hidden_layers
    def key(n: str) -> str:
        if n.startswith("model.layers."):
            return f"block.{int(n.split('.')[2])}"
        if "embed_tokens" in n:
            return "embed"
        return "head" if n.startswith("lm_head") else "head.norm"
    tot: dict[str, float] = {}
    cnt: dict[str, int] = {}
    for n, v in sq.items():
        k = key(n)
        tot[k] = tot.get(k, 0.0) + float(v.sum())
        cnt[k] = cnt.get(k, 0) + v.numel()
    out = {k: tot[k] / (sequences * cnt[k]) for k in tot}
    if "head" not in out:                         # tied: the head is the embedding
        out["head"] = out["embed"]
    assert len(out) == layers + 3
    return out


def reference_alpha(fisher: list[float], delta: list[float], t: float, fisher_only: bool = False) -> np.ndarray:
    score = np.array(fisher) if fisher_only else np.array(fisher) * np.array(delta)
    x = np.log(score)
    z = (x - x.mean()) / x.std()
    return 1.0 / (1.0 + np.exp(t * z))


@pytest.mark.parametrize("tied", [False, True])
def test_fisher_equals_dense_reference(tmp_path, tied):
    from acm.activations.fisher import FisherSettings, fisher_pass

    if tied:
        base, _ = build_pair("qwen2.5-math-1.5b", tmp_path, layers=2)   # tied base (Qwen2)
    else:
        base, _ = make_pair(tmp_path)
        base = str(base)
    block = fisher_pass(str(base), FisherSettings(sequences=3, length=12, seed=5), device="cpu", dtype="float32")
    ref = dense_fisher(str(base), 3, 12, 5)
    assert block["tied_head"] is tied
    got = dict(zip(block["keys"], block["scores"]))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-12), k
    assert all(v > 0 for v in got.values())


def test_fisher_is_seeded_and_sampled_loss_differs(tmp_path):
    from acm.activations.fisher import FisherSettings, fisher_pass

    base, _ = make_pair(tmp_path)
    a = fisher_pass(str(base), FisherSettings(2, 8, 1), device="cpu")["scores"]
    b = fisher_pass(str(base), FisherSettings(2, 8, 1), device="cpu")["scores"]
    c = fisher_pass(str(base), FisherSettings(2, 8, 2), device="cpu")["scores"]
    d = fisher_pass(str(base), FisherSettings(2, 8, 1, "sampled"), device="cpu")["scores"]
    assert a == b and a != c and a != d


def test_alpha_follows_formula():
    from acm.rules.fim import fim_lambdas, fim_scores

    rng = np.random.default_rng(0)
    fisher = rng.uniform(1e-6, 1e-3, 6)
    delta = rng.uniform(0.1, 10.0, (2, 6))
    for t in (0.0, 0.5, 1.0, 3.0):
        got = fim_lambdas(fim_scores(fisher, delta), t)
        for i in range(2):
            assert got[i] == pytest.approx(reference_alpha(fisher, delta[i], t), abs=1e-12)
        only = fim_lambdas(fim_scores(fisher, delta, "fisher-only"), t)
        assert only[0] == pytest.approx(reference_alpha(fisher, delta[0], t, True), abs=1e-12)
        assert only[1] == pytest.approx(only[0])
    grid = fim_lambdas(fim_scores(fisher, delta), [0.0, 1.0])
    assert grid.shape == (2, 2, 6) and np.allclose(grid[0], 0.5)
    # the highest score merges most conservatively
    a = fim_lambdas(fim_scores(fisher, delta), 1.0)[0]
    assert int(np.argmin(a)) == int(np.argmax(fisher * delta[0]))


def test_zero_delta_key_is_left_out_of_the_normalisation():
    from acm.rules.fim import fim_lambdas

    a = fim_lambdas(np.array([[1.0, 10.0, 100.0, 0.0]]), 1.0)[0]
    ref = reference_alpha([1.0, 10.0, 100.0], [1, 1, 1], 1.0, True)
    assert a[:3] == pytest.approx(ref) and a[3] == pytest.approx(ref.max())


def _fim_analysis(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    base, fts = make_pair(tmp_path, n_ft=2)
    out = tmp_path / "fim.json"
    assert main(["analyze", "--rule", "fim", "--base", str(base), *[a for f in fts for a in ("--ft", str(f))],
                 "--fim-sequences", "3", "--fim-length", "16", "--device", "cpu", "--out", str(out)]) == 0
    return base, fts, out


def test_cli_analyze_coefficients_merge(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from acm.activations.result import AnalysisResult

    base, fts, out = _fim_analysis(tmp_path)
    a = AnalysisResult.load(out)
    fb = a.fisher
    assert fb["sequences"] == 3 and fb["length"] == 16 and fb["seed"] == 0 and fb["loss"] == "lm"
    assert len(fb["delta_sq"]) == 2 and all(v > 0 for v in fb["delta_sq"][0])
    # ‖δ‖² equals the direct sum over the checkpoints
    b, f = load_file(str(base / "model.safetensors")), load_file(str(fts[0] / "model.safetensors"))
    total = sum(float(((f[k].double() - b[k].double()) ** 2).sum()) for k in b)
    assert sum(fb["delta_sq"][0]) == pytest.approx(total, rel=1e-6)
    capsys.readouterr()
    assert main(["coefficients", "--analysis", str(out), "--rule", "fim", "--t", "2"]) == 0
    table = json.loads(capsys.readouterr().out)
    lam = [r["lambda"] for r in table["models"][0]["groups"]]
    assert lam == pytest.approx(list(reference_alpha(fb["scores"], fb["delta_sq"][0], 2.0)), abs=1e-9)
    assert main(["coefficients", "--analysis", str(out), "--rule", "fim", "--format", "yaml"]) == 0
    yaml_text = capsys.readouterr().out
    assert "FIM" in yaml_text and "merge_method: task_arithmetic" in yaml_text
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), *[a for f in fts for a in ("--ft", str(f))], "--acm", str(out),
                 "--rule", "fim", "--t", "2", "--device", "cpu", "--out", str(merged)]) == 0
    rec = json.loads((merged / "acm_recipe.json").read_text())
    assert rec["acm_analysis"]["rule"] == "fim" and rec["lambdas"][0]["lambda"]["block.0"] == pytest.approx(
        reference_alpha(fb["scores"], fb["delta_sq"][0], 2.0)[1], abs=1e-6)
    card = (merged / "README.md").read_text()
    assert "fim" in card and "--rule fim" in card
    # θ = θ₀ + Σᵢ αᵢ τᵢ on one block tensor
    m = load_file(str(merged / "model.safetensors"))
    name = next(k for k in b if k.startswith("model.layers.1.") and k.endswith("q_proj.weight"))
    f1 = load_file(str(fts[1] / "model.safetensors"))
    al = [reference_alpha(fb["scores"], fb["delta_sq"][i], 2.0)[2] for i in range(2)]
    want = b[name].double() + al[0] * (f[name].double() - b[name].double()) + al[1] * (f1[name].double() - b[name].double())
    assert torch.allclose(m[name].double(), want, atol=2e-2 * float(want.abs().max()))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == 7


def test_cli_merge_on_the_fly_ties_and_reproduce(tmp_path, capsys):
    base, fts = make_pair(tmp_path)
    out = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--ft", str(fts[0]), "--method", "ties", "--density", "0.2",
                 "--rule", "fim", "--fim-score", "fisher-only", "--fim-sequences", "2", "--fim-length", "8",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fim rule" in text
    rec = json.loads((out / "acm_recipe.json").read_text())
    entry = rec["acm_analysis"]
    assert entry["rule"] == "fim" and entry["score"] == "fisher-only" and entry["fisher"]["sequences"] == 2
    from acm.merging.export import reproduce_command

    cmd = reproduce_command(rec)
    assert "--rule fim" in cmd and "--fim-score fisher-only" in cmd and "--fim-sequences 2" in cmd
    assert "--acm" not in cmd and "--density 0.2" in cmd


@pytest.mark.parametrize("argv, needle", [
    (["coefficients", "--rule", "fim", "--t", "11"], "t must be in"),
    (["coefficients", "--rule", "fim"], "no Fisher pass"),
])
def test_bad_input_one_line(tmp_path, capsys, argv, needle):
    path = Path(__file__).parent / "data" / "analysis_v1_nmi_only.json"
    rc = main([*argv[:1], "--analysis", str(path), *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and needle in err and len(err.splitlines()) == 1


def test_bad_fim_flags(tmp_path, capsys):
    base, fts = make_pair(tmp_path)
    capsys.readouterr()
    rc = main(["merge", "--base", str(base), "--ft", str(fts[0]), "--rule", "fim", "--fim-loss", "nope",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "loss must be one of" in err and len(err.splitlines()) == 1
    rc = main(["analyze", "--rule", "fim", "--base", str(base), "--ft", str(fts[0]), "--fim-sequences", "0",
               "--out", str(tmp_path / "a.json")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "sequences" in err and len(err.splitlines()) == 1
    rc = main(["merge", "--base", str(base), "--ft", str(fts[0]), "--fim-score", "fisher-only",
               "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "add --rule fim" in err and len(err.splitlines()) == 1
    rc = main(["merge", "--base", str(base), "--ft", str(fts[0]), "--rule", "fim", "--t", "-1",
               "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "t must be in [0, 10]" in err and len(err.splitlines()) == 1


def test_cli_on_the_tied_untied_standin_pair(tmp_path, capsys):
    """The paper's 1.5B pair in miniature (tied base, untied fine-tune, real vocabulary): analyze --rule fim, merge
    with FIM-TIES, reload and generate; the head's ‖δ‖² compares the fine-tune's head with the base's embedding."""
    from transformers import AutoModelForCausalLM

    from acm.activations.result import AnalysisResult

    base, ft = build_pair("qwen2.5-math-1.5b", tmp_path, layers=2)
    out = tmp_path / "fim.json"
    assert main(["analyze", "--rule", "fim", "--base", str(base), "--ft", str(ft), "--fim-sequences", "2",
                 "--fim-length", "8", "--device", "cpu", "--out", str(out)]) == 0
    fb = AnalysisResult.load(out).fisher
    assert fb["tied_head"] is True and fb["scores"][-1] == fb["scores"][0]          # head = embed's Fisher
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    head = float(((f["lm_head.weight"].double() - b["model.embed_tokens.weight"].double()) ** 2).sum())
    assert fb["delta_sq"][0][-1] == pytest.approx(head, rel=1e-6)
    merged = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--ft", str(ft), "--method", "ties", "--density", "0.2", "--acm", str(out),
                 "--rule", "fim", "--tokenizer-from", "ft", "--device", "cpu", "--out", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.config.tie_word_embeddings is False
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape[1] == 6


def test_tune_merges_a_fim_setting(tmp_path):
    """acm tune's merge of a fim point takes α from the analysis' Fisher block (the one library path)."""
    from acm.activations.fisher import FisherSettings, fisher_analysis
    from acm.tune import Setting, _merge

    base, fts = make_pair(tmp_path)
    an = fisher_analysis(str(base), [str(fts[0])], FisherSettings(2, 8), device="cpu")
    folder, _ = _merge(str(base), [str(fts[0])], Setting("ties", None, 2.0, 0.5, rule="fim"), an, tmp_path / "w",
                       threads=1, device="cpu")
    rec = json.loads((folder / "acm_recipe.json").read_text())
    fb = an.fisher
    assert rec["acm_analysis"]["rule"] == "fim" and rec["options"]["density"] == 0.5
    want = dict(zip(fb["keys"], reference_alpha(fb["scores"], fb["delta_sq"][0], 2.0)))
    got = rec["lambdas"][0]["lambda"]
    assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
