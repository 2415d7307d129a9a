"""Loading a checkpoint into another compute dtype on the CPU: same model, without file pages + copy."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from acm.checkpoints.models import load_causal_lm, resolve_model
from acm.checkpoints.residency import convert_parameters, stored_float_dtype
from tests.fixtures import make_tiny_model


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for name in ba:
        assert ba[name].dtype == bb[name].dtype, name
        assert torch.equal(ba[name], bb[name]), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(("stored", "compute"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float32)])
def test_cast_after_load_gives_the_same_model_as_transformers(tmp_path, family, stored, compute):
    path = make_tiny_model(tmp_path / "m", family, dtype=stored, tie_word_embeddings=(family == "qwen2"))
    ours, _ = load_causal_lm(resolve_model(str(path)), device="cpu", dtype=compute)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=compute).eval()
    _same_model(ours, ref)
    assert ours.config.dtype == compute
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    if family == "qwen2":   # a tied head stays tied: one tensor, cast once
        assert ours.get_output_embeddings().weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of the file ``path`` (from /proc/self/smaps).

    The full path, not the file name: other tests in the same process may still map their own
    ``model.safetensors``."""
    name = str(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) >= 6 and head[-1] == name
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_cast_gives_back_the_checkpoint_pages(tmp_path):
    # ~25 MB of bf16 weights: large enough that the mapped pages are unmistakable.
    path = make_tiny_model(tmp_path / "m", "llama", dtype=torch.bfloat16, hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=4, vocab_size=2048)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())   # fault every page in
    weights = (path / "model.safetensors").resolve()
    before = _mapped_rss_kib(weights)
    assert before > 10_000, before
    dropped = convert_parameters(model, torch.float32)
    after = _mapped_rss_kib(weights)
    assert dropped > 0.9 * before * 1024
    assert after < 0.05 * before, (before, after)
    with torch.no_grad():
        assert sum(float(p.sum()) for p in model.parameters()) == pytest.approx(checksum, rel=1e-6)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_stored_float_dtype():
    assert stored_float_dtype([torch.bfloat16, torch.int64, torch.bfloat16]) == torch.bfloat16
    assert stored_float_dtype([torch.bfloat16, torch.float32]) is None
    assert stored_float_dtype([torch.int8]) is None
