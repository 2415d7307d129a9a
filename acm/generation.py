"""Generation helpers: batched greedy decoding for the evaluator, token streaming for the chat.

Both go through the tokenizer's chat template when it has one, so a model is always prompted the
way it was trained to be answered; plain ``question`` text is used otherwise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from acm.errors import InputError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, messages: Sequence[dict] | str, *, chat_template: bool = True) -> str:
    """The text the model sees: the chat template with a generation prompt, or the raw text."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise InputError("the tokenizer has neither a pad nor an eos token; set one before generating")


@dataclass
class Completion:
    """One generated reply: its text and its length in generated tokens (EOS included)."""

    text: str
    num_tokens: int
    finished: bool  # ended with EOS (False: hit max_new_tokens)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 512,
                   chat_template: bool = True, add_special_tokens: bool | None = None) -> list[Completion]:
    """Greedy decoding of a batch with left padding (as the paper's evaluation: deterministic).

    The length counted is the number of generated tokens up to and including the first EOS, so a
    model that stops early is not charged for the padding of its batch neighbours.
    """
    if not prompts:
        return []
    texts = [build_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    templated = chat_template and has_chat_template(tokenizer)
    if add_special_tokens is None:
        add_special_tokens = not templated  # a chat template already holds its special tokens
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad_id
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None,
                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    results = []
    for row in new:
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        kept = row if stop is None else row[:stop]
        results.append(Completion(
            text=tokenizer.decode(kept, skip_special_tokens=True),
            num_tokens=len(kept) + (0 if stop is None else 1), finished=stop is not None))
    return results


def generate_stream(model, tokenizer, messages: Sequence[dict] | str, *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, chat_template: bool = True) -> Iterator[str]:
    """Yield the growing reply text while the model generates it (for the side-by-side chat).

    ``temperature`` 0 means greedy. Generation runs in a background thread feeding a
    ``TextIteratorStreamer``; each yielded string is the whole reply so far.
    """
    from transformers import TextIteratorStreamer

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    text = build_prompt(tokenizer, messages, chat_template=chat_template)
    templated = chat_template and has_chat_template(tokenizer)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120.0)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    kwargs = dict(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                  max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=eos_ids or None,
                  pad_token_id=_pad_id(tokenizer, eos_ids), **sampling)
    errors: list[BaseException] = []

    def _run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    thread.join()
    if errors:
        raise errors[0]
