"""Batched greedy generation and the streaming chat helper, on the bundled demo base model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from acm.checkpoints.models import load_model
from acm.errors import InputError
from acm.evaluation.generation import build_prompt, generate_batch, generate_stream

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
    assert all(b.startswith(a) for a, b in itertools.pairwise(chunks))
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


def test_sampled_batch_is_seeded_and_leaves_the_callers_rng_alone(base):
    import torch

    from acm.evaluation.generation import Sampling

    model, tok = base
    prompts = ["What is 47 + 8?", "What is 3 + 9?"]
    hot = Sampling(temperature=1.5, top_p=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_batch(model, tok, prompts, max_new_tokens=12, sampling=hot, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)                     # forked RNG: the caller's stream is unchanged
    b = generate_batch(model, tok, prompts, max_new_tokens=12, sampling=hot, seed=7)
    assert [c.text for c in a] == [c.text for c in b]
    others = [generate_batch(model, tok, prompts, max_new_tokens=12, sampling=hot, seed=s) for s in range(8, 12)]
    assert any([c.text for c in o] != [c.text for c in a] for o in others)
    greedy = generate_batch(model, tok, prompts, max_new_tokens=12)
    assert greedy[0].thinking_tokens == 0 and not greedy[0].thinking_opened


def test_sampling_settings_and_generation_config():
    from transformers import GenerationConfig

    from acm.evaluation.generation import Sampling, sampling_from_model

    assert Sampling().greedy and Sampling().to_dict() == {"mode": "greedy"}
    assert Sampling(0.6, 0.95).generate_kwargs() == {"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                     "top_k": 0, "repetition_penalty": 1.0}
    assert Sampling().generate_kwargs()["repetition_penalty"] == 1.0       # explicit: no penalty sneaks in
    assert Sampling(repetition_penalty=1.05).to_dict() == {"mode": "greedy", "repetition_penalty": 1.05}
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 1.5},
                {"repetition_penalty": 0}, {"repetition_penalty": True}):
        with pytest.raises(InputError):
            Sampling(**bad)

    class M:
        generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95)

    assert sampling_from_model(M()) == Sampling(0.6, 0.95, 0)              # R1-distill's card settings
    assert sampling_from_model(M(), {"temperature": 1.0, "top_p": None}) == Sampling(1.0, 0.95, 0)
    M.generation_config = GenerationConfig(do_sample=False, max_new_tokens=512)
    assert sampling_from_model(M()).greedy                                  # the bundled models: greedy
    M.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                           repetition_penalty=1.05)         # Qwen2.5 instruct models' file
    assert sampling_from_model(M()) == Sampling(0.7, 0.8, 20, 1.05)
    M.generation_config = GenerationConfig(repetition_penalty=1.1)
    assert sampling_from_model(M()) == Sampling(repetition_penalty=1.1)     # greedy, penalty kept


def test_a_models_own_repetition_penalty_applies_only_when_asked_for(base):
    """Greedy means greedy: a repetition_penalty in the model's generation_config (Qwen2.5 instruct
    models ship 1.05) is not applied behind the caller's back — the vLLM engine never reads that file,
    so the two engines decode alike; with "each model's generation_config" it is applied."""
    from acm.evaluation.generation import Sampling, sampling_from_model

    model, tok = base
    prompts = ["What is 47 + 8?", "Start with 10. (a) Add 9. (b) Take away 6. What is the result?"]
    plain = [c.text for c in generate_batch(model, tok, prompts, max_new_tokens=24)]
    saved = model.generation_config.repetition_penalty
    try:
        model.generation_config.repetition_penalty = 50.0   # strong enough to change a greedy reply
        assert [c.text for c in generate_batch(model, tok, prompts, max_new_tokens=24)] == plain
        own = sampling_from_model(model)
        assert own == Sampling(repetition_penalty=50.0)
        assert [c.text for c in generate_batch(model, tok, prompts, max_new_tokens=24, sampling=own)] != plain
    finally:
        model.generation_config.repetition_penalty = saved


def test_thinking_tokens_are_counted_up_to_the_closing_tag(base):
    from acm.evaluation.generation import count_thinking_tokens, opens_thinking

    _, tok = base
    ids = tok("<think>so 4</think> A: 4", add_special_tokens=False)["input_ids"]
    head = tok("<think>so 4</think>", add_special_tokens=False)["input_ids"]
    assert count_thinking_tokens(tok, ids) == len(head) < len(ids)
    open_ids = tok("so 4 and", add_special_tokens=False)["input_ids"]
    assert count_thinking_tokens(tok, open_ids) == 0                        # no thinking block
    assert count_thinking_tokens(tok, open_ids, opened=True) == len(open_ids)   # opened by the template
    assert count_thinking_tokens(tok, []) == 0
    assert opens_thinking("<|assistant|><think>\n") and not opens_thinking("<|assistant|>")
