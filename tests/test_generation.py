"""Batched greedy generation and the streaming chat helper, on the bundled demo base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from acm.errors import InputError
from acm.evaluate import load_model
from acm.generation import build_prompt, generate_batch, generate_stream

BASE = Path(__file__).resolve().parents[1] / "assets" / "demo-models" / "tiny-math-base"


@pytest.fixture(scope="module")
def base():
    return load_model(BASE)


def test_prompt_uses_chat_template(base):
    _, tok = base
    text = build_prompt(tok, "What is 2 + 3?")
    assert text == "<|user|>What is 2 + 3?\n<|assistant|>"
    assert build_prompt(tok, "hi", chat_template=False) == "hi"


def test_batch_greedy_is_padding_invariant(base):
    model, tok = base
    alone = generate_batch(model, tok, ["What is 47 + 8?"], max_new_tokens=12)
    batched = generate_batch(model, tok, ["What is 47 + 8?", "Calculate 4736 + 2958 column by column please."],
                             max_new_tokens=12)
    assert alone[0].text == batched[0].text
    assert alone[0].num_tokens == batched[0].num_tokens
    assert 1 <= alone[0].num_tokens <= 12


def test_stream_yields_growing_text_equal_to_greedy(base):
    model, tok = base
    messages = [{"role": "user", "content": "What is 47 + 8?"}]
    chunks = list(generate_stream(model, tok, messages, max_new_tokens=12))
    assert chunks, "nothing streamed"
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    greedy = generate_batch(model, tok, ["What is 47 + 8?"], max_new_tokens=12)[0].text
    assert chunks[-1].strip() == greedy.strip()


def test_stream_sampling_and_bad_settings(base):
    model, tok = base
    out = list(generate_stream(model, tok, "What is 5 + 4?", max_new_tokens=6, temperature=0.8, top_p=0.9))
    assert out and isinstance(out[-1], str)
    with pytest.raises(InputError):
        next(generate_stream(model, tok, "hi", max_new_tokens=0))
    with pytest.raises(InputError):
        next(generate_stream(model, tok, "hi", top_p=0.0))
