"""The pairs people actually merge, end to end: analyse → coefficients → merge → load → generate.

Each stand-in (tests/standins.py) keeps the structural quirks of the real checkpoints — real
vocabulary sizes, tied/untied heads, GQA ratios, rope scaling, sharded index files, their own
chat templates, special tokens and generation configs — with tiny hidden sizes, so the whole
workflow runs in seconds through the CLI and through the app's handlers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures import write_calibration
from tests.standins import PAIRS

CASES = [("qwen2.5-math-1.5b", False), ("qwen2.5-math-1.5b", True), ("qwen2.5-math-7b", False),
         ("llama-3.1-8b", True), ("qwen3", False)]


def acm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "acm", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def weight_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    return keys


def run_pipeline(base: Path, ft: Path, tmp_path: Path, *, cli: bool) -> Path:
    """analyze → coefficients → merge (ACM-TIES, tokenizer from the fine-tuned model, 5MB shards)."""
    cal = write_calibration(tmp_path / "cal.jsonl", 12)
    analysis, out = tmp_path / "analysis.json", tmp_path / "merged"
    if cli:
        acm("analyze", "--base", str(base), "--ft", str(ft), "--calibration", str(cal), "--samples", "6",
            "--clusters", "3", "--max-tokens", "48", "--out", str(analysis))
        yaml_text = acm("coefficients", "--analysis", str(analysis), "--t", "2", "--format", "yaml").stdout
        acm("merge", "--base", str(base), "--ft", str(ft), "--method", "ties", "--density", "0.3", "--acm",
            str(analysis), "--t", "2", "--alpha", "0.8", "--tokenizer-from", "ft", "--shard-size", "5MB",
            "--out", str(out))
    else:
        from acm.activations.analysis import analyze
        from acm.merging.engine import MergeOptions, merge_models
        from acm.merging.mergekit import to_mergekit_yaml
        from acm.rules.coefficients import lambdas_by_group

        result = analyze(str(base), [str(ft)], str(cal), samples=6, clusters=3, max_tokens=48, show_progress=False)
        result.save(analysis)
        yaml_text = to_mergekit_yaml(result, 2.0, 0.8, method="ties", density=0.3, rule="softmax")
        merge_models(str(base), [str(ft)], out, MergeOptions(method="ties", density=0.3, alpha=0.8,
                                                           tokenizer_from="ft", shard_size="5MB"),
                     lambdas=lambdas_by_group(result, 2.0, 0.8, rule="softmax"), acm={"t": 2.0, "alpha": 0.8},
                     show_progress=False)
    assert "merge_method:" in yaml_text
    result = json.loads(analysis.read_text())
    nmi = result["models"][0]["nmi"]
    assert len(nmi) == len(result["groups"]) == 2 + 2 and all(0.0 <= v <= 1.0 for v in nmi)
    return out


@pytest.mark.parametrize("name,shards", CASES, ids=[f"{n}{'-sharded' if s else ''}" for n, s in CASES])
def test_end_to_end(standin_pair, tmp_path, name, shards):
    base, ft = standin_pair(name, shards=shards)
    spec = PAIRS[name]
    out = run_pipeline(base, ft, tmp_path, cli=name == "qwen2.5-math-1.5b" and not shards)   # the paper's pair: CLI
    base_tied = spec.base.config.get("tie_word_embeddings", False)
    ft_tied = spec.ft.config.get("tie_word_embeddings", False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == spec.base.config["vocab_size"]
    assert cfg["tie_word_embeddings"] is (base_tied and ft_tied)
    assert ("lm_head.weight" in weight_keys(out)) is not (base_tied and ft_tied)
    assert (out / "model.safetensors.index.json").is_file()          # 5MB shards: the output is sharded too
    # tokenizer, chat template and generation defaults of the fine-tuned (R1-distilled) model
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(ft).chat_template
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((ft / "generation_config.json").read_text())
    recipe = json.loads((out / "acm_recipe.json").read_text())
    assert recipe["output"]["tokenizer"]["from"] == "ft:1"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == spec.base.config["vocab_size"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 4 or int(gen[0, -1]) in (
        model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id])


def test_paper_pair_through_the_app_handlers(standin_pair, tmp_path):
    """Check → Analyse → Merge (ACM-TIES, tokenizer from the fine-tuned model) → Chat, as a Space visitor."""
    from components import chat, merge, models
    from components.analysis import run_analysis
    from components.state import SessionState

    base, ft = standin_pair("qwen2.5-math-1.5b")
    state = SessionState()
    try:
        summary = models.check_models(state, str(base), [str(ft)])
        assert "| tied |" in summary and "| untied |" in summary and "merged model is untied" in summary
        run_analysis(state, str(base), [str(ft)], samples=4, clusters=2, max_tokens=32)
        assert state.analysis is not None and state.analysis.provenance["heads"]["merged"] == "untied"
        merged = merge.run_merge(state, str(base), [str(ft)], method="ties", mode="acm", t=1.0, alpha=0.7,
                                 density=0.5, tokenizer_from="ft:1")
        assert merged.settings["tokenizer_from"] == "ft:1"
        assert "untied output head" in merge.summary_markdown(merged)
        assert merged.model.lm_head.weight.data_ptr() != merged.model.get_input_embeddings().weight.data_ptr()
        last = None
        for update in chat.chat_stream(state, "What is 2+3?", str(base), [str(ft)], max_new_tokens=3):
            last = update
        lines = last[len(chat.SLOTS):2 * len(chat.SLOTS)]
        merged_line, base_line, ft_line = lines[0], lines[1], lines[2]
        assert "DeepSeek-R1" in merged_line and "151643" in merged_line          # R1 template, its end of turn
        assert "ChatML" in base_line and "&lt;|im_end|&gt; (151645)" in base_line   # ChatML ends at im_end
        assert "DeepSeek-R1" in ft_line
    finally:
        state.close()


@pytest.mark.parametrize("name,role,family,must_stop_at", [
    ("qwen2.5-math-1.5b", "base", "ChatML", "<|im_end|>"),          # eos is <|endoftext|>; a chat turn ends at im_end
    ("qwen2.5-math-1.5b", "ft", "DeepSeek-R1", "<｜end▁of▁sentence｜>"),
    ("qwen3", "ft", "ChatML", "<|im_end|>"),
])
def test_each_model_stops_at_its_own_end_of_turn(standin_pair, name, role, family, must_stop_at):
    from acm.checkpoints.templates import template_family
    from acm.evaluation.generation import _eos_ids

    folder = dict(zip(("base", "ft"), standin_pair(name)))[role]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert template_family(tok) == family
    assert tok.convert_tokens_to_ids(must_stop_at) in _eos_ids(model, tok)
