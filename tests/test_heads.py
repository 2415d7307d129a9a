"""Tied and untied output heads in any mix, and the tokenizer a merged model is saved with.

The paper's own pair mixes heads: Qwen2.5-Math-1.5B is tied (no ``lm_head.weight``),
DeepSeek-R1-Distill-Qwen-1.5B untied. Formulas pinned here (docs/formulas.md):
merged head = base head + Σ λ_head·(headᵢ − base head), a tied model's head being its embedding;
the input embedding uses λ_embed; untied output whenever any input has its own head.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from acm.checkpoints.compatibility import check_compatibility
from acm.checkpoints.models import resolve_model
from acm.errors import CompatibilityError, InputError
from acm.merging.engine import MergeOptions, merge_models
from tests.fixtures import make_tiny_model, write_calibration
from tests.test_merge import load_state

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def build(root: Path, ties: list[bool], family: str = "qwen2") -> tuple[Path, list[Path]]:
    """A base (ties[0]) and fine-tuned descendants (ties[1:]); True = tied head."""
    base = make_tiny_model(root / "base", family, seed=0, tie_word_embeddings=ties[0])
    fts = [make_tiny_model(root / f"ft{i}", family, seed=i + 1, init_from=base, tie_word_embeddings=t, noise=0.05)
           for i, t in enumerate(ties[1:])]
    return base, fts


def head_of(state: dict) -> torch.Tensor:
    return (state[HEAD] if HEAD in state else state[EMBED]).float()


def lams(n: int, embed: float = 0.4, head: float = 1.3) -> list[dict[str, float]]:
    out = []
    for i in range(n):
        d = {"embed": embed + 0.1 * i, "block.0": 0.8, "block.1": 0.9, "head": head + 0.2 * i}
        out.append(d)
    return out


MIXES = {
    "paper: tied base, untied ft": [True, False],
    "untied base, tied ft": [False, True],
    "all tied": [True, True],
    "all untied": [False, False],
    "tied base, three mixed": [True, False, True, False],
    "untied base, two tied": [False, True, True],
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_every_mix_merges_with_the_documented_head(tmp_path, mix, method):
    ties = MIXES[mix]
    base, fts = build(tmp_path, ties)
    coeffs = lams(len(fts))
    report = merge_models(str(base), [str(f) for f in fts], tmp_path / "out",
                          MergeOptions(method=method, density=0.5, dtype="float32"), lambdas=coeffs,
                          show_progress=False)
    got = load_state(report.out_dir)
    cfg = json.loads((report.out_dir / "config.json").read_text())
    untied_out = not all(ties)
    assert (HEAD in got) == untied_out
    assert cfg["tie_word_embeddings"] is (not untied_out)
    heads = report.recipe["output"]["heads"]
    assert heads["merged"] == ("untied" if untied_out else "tied")
    assert heads["base"] == ("tied" if ties[0] else "untied")
    b = load_state(base)
    f = [load_state(p) for p in fts]
    if method == "task_arithmetic":
        want_embed = b[EMBED].float() + sum(c["embed"] * (s[EMBED].float() - b[EMBED].float()) for c, s in zip(coeffs, f))
        torch.testing.assert_close(got[EMBED], want_embed, rtol=1e-6, atol=1e-6)
        if untied_out:
            want_head = head_of(b) + sum(c["head"] * (head_of(s) - head_of(b)) for c, s in zip(coeffs, f))
            torch.testing.assert_close(got[HEAD], want_head, rtol=1e-6, atol=1e-6)
    # transformers loads it with the head we wrote (not re-tied to the embedding) and generates
    model = AutoModelForCausalLM.from_pretrained(report.out_dir, dtype=torch.float32)
    if untied_out:
        assert torch.equal(model.lm_head.weight.detach(), got[HEAD])
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    else:
        assert torch.equal(model.get_input_embeddings().weight.detach(), got[EMBED])
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_paper_pair_head_formula_exact_in_float32(tmp_path):
    """The issue's acceptance formula, for the plain method too: head = E₀ + λ·(H₁ − E₀)."""
    base, (ft,) = build(tmp_path, [True, False])
    report = merge_models(str(base), [str(ft)], tmp_path / "out",
                          MergeOptions(method="task_arithmetic", alpha=0.7, dtype="float32"), show_progress=False)
    got, b, f = load_state(report.out_dir), load_state(base), load_state(ft)
    assert HEAD not in b and HEAD in f
    torch.testing.assert_close(got[HEAD], b[EMBED].float() + 0.7 * (f[HEAD].float() - b[EMBED].float()),
                               rtol=0, atol=1e-6)
    card = (report.out_dir / "README.md").read_text()
    assert "Output head: **untied**" in card and "tie_word_embeddings: false" in card


def test_compatibility_reports_heads_and_refuses_hidden_head_mismatch(tmp_path):
    base, (ft,) = build(tmp_path, [True, False])
    report = check_compatibility(resolve_model(str(base)), [resolve_model(str(ft))])
    assert report.heads["base"] == "tied" and report.heads["fine_tuned"] == ["untied"]
    assert any("merged model is untied" in n for n in report.head_notes)
    assert "tied head" in report.summary()
    # a hidden-size mismatch hidden behind the head: config and every other tensor agree
    state = load_file(str(ft / "model.safetensors"))
    state[HEAD] = state[HEAD][:, :8].contiguous()
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match=r"^output head differs: base .* tied head .*, .* own head "
                                                 r"lm_head.weight \[\d+, 8\]$"):
        check_compatibility(resolve_model(str(base)), [resolve_model(str(ft))])


def test_untied_config_without_head_tensor_is_refused(tmp_path):
    base, (ft,) = build(tmp_path, [True, False])
    state = load_file(str(ft / "model.safetensors"))
    del state[HEAD]
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match="says its head is untied .* has no lm_head.weight"):
        check_compatibility(resolve_model(str(base)), [resolve_model(str(ft))])


def test_redundant_head_copy_in_a_tied_checkpoint_is_ignored(tmp_path):
    base, (ft,) = build(tmp_path, [True, True])
    state = load_file(str(base / "model.safetensors"))
    state[HEAD] = torch.zeros_like(state[EMBED])            # transformers ignores it when tied: so do we
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    report = merge_models(str(base), [str(ft)], tmp_path / "out", MergeOptions(alpha=0.5), show_progress=False)
    assert HEAD not in load_state(report.out_dir)


def test_analysis_and_mergekit_yaml_on_the_paper_mix(tmp_path):
    from acm.activations.analysis import analyze
    from acm.merging.mergekit import to_mergekit_yaml

    base, (ft,) = build(tmp_path, [True, False])
    result = analyze(str(base), [str(ft)], str(write_calibration(tmp_path / "cal.jsonl", 8)), samples=4,
                     clusters=2, max_tokens=32, show_progress=False)
    assert result.groups[-1] == "head" and len(result.models[0].nmi) == len(result.groups)
    assert result.provenance["heads"]["merged"] == "untied"
    assert HEAD in result.provenance["group_tensors"]["head"]
    text = to_mergekit_yaml(result, 2.0, 1.0, method="ties", density=0.3, tokenizer_source=str(ft), rule="softmax")
    assert "filter: lm_head" in text
    assert "tie_word_embeddings: true: transformers then ties the head" in text
    assert "do not use mergekit's tokenizer_source" in text


# ------------------------------------------------------------------------------------------
# tokenizer / chat template of the merged model
# ------------------------------------------------------------------------------------------

R1_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% else %}"
               "<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}"
               "<|assistant|>{% endif %}")


def _retemplate(folder: Path, template: str, eos_id: int) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "temperature": 0.6,
                                                               "top_p": 0.95, "do_sample": True}))


def test_tokenizer_from_picks_the_fine_tuned_template(tmp_path):
    from transformers import AutoTokenizer

    base, (ft,) = build(tmp_path, [True, False])
    _retemplate(ft, R1_TEMPLATE, 1)
    opts = MergeOptions(alpha=0.5, tokenizer_from="ft")
    report = merge_models(str(base), [str(ft)], tmp_path / "out", opts, show_progress=False)
    tok = AutoTokenizer.from_pretrained(report.out_dir)
    assert tok.chat_template == AutoTokenizer.from_pretrained(ft).chat_template
    gen = json.loads((report.out_dir / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6
    info = report.recipe["output"]["tokenizer"]
    assert info["from"] == "ft:1" and info["model"] == str(ft)
    assert report.recipe["options"]["tokenizer_from"] == "ft"
    assert "--tokenizer-from ft" in (report.out_dir / "README.md").read_text()
    base_report = merge_models(str(base), [str(ft)], tmp_path / "out2", MergeOptions(alpha=0.5), show_progress=False)
    assert AutoTokenizer.from_pretrained(base_report.out_dir).chat_template == \
        AutoTokenizer.from_pretrained(base).chat_template


@pytest.mark.parametrize("value,message", [("ft:2", "there are 1 fine-tuned model"), ("ft:0", "use ft:1"),
                                           ("other", "must be base, ft or ft:N")])
def test_bad_tokenizer_from(tmp_path, value, message):
    base, (ft,) = build(tmp_path, [True, False])
    with pytest.raises(InputError, match=message):
        merge_models(str(base), [str(ft)], tmp_path / "out", MergeOptions(tokenizer_from=value), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_special_token_past_the_vocabulary_is_one_clear_line(tmp_path):
    """A tokenizer whose added special token points at a row no model has: refused, nothing written."""
    from transformers import AutoTokenizer

    base, (ft,) = build(tmp_path, [True, False])
    tok = AutoTokenizer.from_pretrained(ft)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.save_pretrained(ft)
    proc = subprocess.run([sys.executable, "-m", "acm", "merge", "--base", str(base), "--ft", str(ft),
                           "--tokenizer-from", "ft", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has id" in lines[0] and "embedding rows" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_merges_the_paper_mix_and_says_what_it_did(tmp_path):
    base, (ft,) = build(tmp_path, [True, False])
    proc = subprocess.run([sys.executable, "-m", "acm", "merge", "--base", str(base), "--ft", str(ft),
                           "--method", "ties", "--density", "0.2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output head: untied (base tied, fine-tuned untied)" in proc.stdout
    assert "tokenizer and chat template" in proc.stdout


def test_cli_hidden_head_mismatch_is_one_line_and_writes_nothing(tmp_path):
    base, (ft,) = build(tmp_path, [True, False])
    state = load_file(str(ft / "model.safetensors"))
    state[HEAD] = state[HEAD][:, :8].contiguous()
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    for cmd in (["merge", "--out", str(tmp_path / "out")],
                ["analyze", "--calibration", "bundled", "--out", str(tmp_path / "a.json")]):
        proc = subprocess.run([sys.executable, "-m", "acm", cmd[0], "--base", str(base), "--ft", str(ft), *cmd[1:]],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "output head differs" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "a.json").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
