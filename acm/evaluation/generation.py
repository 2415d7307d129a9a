"""Generation helpers: batched greedy or sampled decoding for the evaluator, token streaming for the chat.

Both go through the tokenizer's chat template when it has one, so a model is always prompted the
way it was trained to be answered; plain ``question`` text is used otherwise. R1-distilled models
are meant to be sampled (their cards: temperature 0.6, top-p 0.95) and loop under greedy decoding,
so the evaluator offers both; sampled runs are seeded per batch and reproducible.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

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
    """Every id that ends a reply: eos of the generation config, config and tokenizer, and the chat
    template's end-of-turn token (``acm.checkpoints.templates.end_of_turn_ids``)."""
    from acm.checkpoints.templates import end_of_turn_ids

    return end_of_turn_ids(model, tokenizer)


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise InputError("the tokenizer has neither a pad nor an eos token; set one before generating")


MAX_NEW_TOKENS_LIMIT = 32768
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: ``temperature`` 0 is greedy; ``top_k`` 0 means no top-k cut;
    ``repetition_penalty`` 1 is none (transformers' and vLLM's definition: the logits of tokens already in
    the prompt or the reply are divided by it when positive, multiplied when negative)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top-p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float)) \
                or not 0 < self.repetition_penalty < float("inf"):
            raise InputError(f"repetition penalty must be a finite number > 0 (1 = none), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        """The ``model.generate`` arguments; explicit values so a model's own generation_config
        (e.g. Qwen's top_k 20, or the repetition_penalty 1.05 of Qwen2.5 instruct models) never changes
        what was asked for — and the vLLM engine, which never reads that file, decodes the same way."""
        penalty = {"repetition_penalty": float(self.repetition_penalty)}
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **penalty}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "top_k": int(self.top_k), **penalty}

    def to_dict(self) -> dict:
        """What a result file records; the penalty only when there is one (older files stay as they were)."""
        d = {"mode": "greedy"} if self.greedy else {"mode": "sampled", **asdict(self)}
        d.pop("repetition_penalty", None)
        if self.repetition_penalty != 1:
            d["repetition_penalty"] = float(self.repetition_penalty)
        return d


def sampling_from_model(model, override: dict | None = None) -> Sampling:
    """The decoding a model's ``generation_config.json`` asks for (R1-distill: sampled at 0.6 / 0.95).

    Only values the file sets count (``to_diff_dict``), so library defaults never sneak in; a file
    without ``do_sample: true`` means greedy. ``override`` (non-None values) wins over the file.
    """
    gc = getattr(model, "generation_config", None)
    diff = gc.to_diff_dict() if gc is not None else {}
    values = {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
              "repetition_penalty": float(diff.get("repetition_penalty", 1.0) or 1.0)}   # applies greedy too
    if diff.get("do_sample"):
        values.update(temperature=float(diff.get("temperature", 1.0) or 1.0),
                      top_p=float(diff.get("top_p", 1.0) or 1.0), top_k=int(diff.get("top_k", 0) or 0))
    values.update({k: v for k, v in (override or {}).items() if v is not None})
    return Sampling(**values)


def check_max_new_tokens(max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
    return max_new_tokens


@dataclass
class Completion:
    """One generated reply: its text, its length in generated tokens (EOS included), and for
    replies that think, how many of those tokens were thinking (up to and including ``</think>``)."""

    text: str
    num_tokens: int
    finished: bool  # ended with EOS (False: hit max_new_tokens)
    thinking_tokens: int = 0
    thinking_opened: bool = False   # the prompt itself opened a <think> block (R1-distill templates)


def count_thinking_tokens(tokenizer, ids: Sequence[int], *, opened: bool = False) -> int:
    """Generated tokens spent thinking: up to and including the token that closes ``</think>``.

    Binary search on decoded prefixes (whether a prefix contains ``</think>`` is monotone), so it
    works whether the tag is one token (R1, Qwen3) or several, in O(log n) decodes. An open block
    that never closes counts every token as thinking; a reply without a block counts 0.
    """
    ids = list(ids)

    def closed_by(k: int) -> bool:
        return THINK_CLOSE in tokenizer.decode(ids[:k], skip_special_tokens=False)

    if not ids or not closed_by(len(ids)):
        opened = opened or THINK_OPEN in tokenizer.decode(ids, skip_special_tokens=False)
        return len(ids) if opened else 0
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if closed_by(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def opens_thinking(prompt_text: str) -> bool:
    """Whether a templated prompt ends inside an open ``<think>`` block (DeepSeek-R1-Distill)."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


def seed_for(seed: int, *parts: int) -> int:
    """A per-batch seed from the run seed and the batch's coordinates (sample, batch index), so a
    batch's replies do not depend on how many batches ran before it."""
    value = int(seed) & 0xFFFFFFFF
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2 ** 63 - 1)
    return value


@dataclass
class PromptBatch:
    """What a batch of prompts becomes before decoding, the same for every generation engine:
    the templated texts and, per prompt, the unpadded token ids the model is fed."""

    texts: list[str]
    ids: list[list[int]]
    templated: bool               # the chat template was applied
    add_special_tokens: bool      # whether the tokenizer added its own BOS/EOS to the texts


def encode_prompts(tokenizer, prompts: Sequence[Sequence[dict] | str], *, chat_template: bool = True,
                   add_special_tokens: bool | None = None) -> PromptBatch:
    """Template and tokenize prompts once, for every engine (transformers pads these texts; vLLM
    receives these ids), so the two engines can only differ in how they decode, not in what they see."""
    texts = [build_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    templated = chat_template and has_chat_template(tokenizer)
    if add_special_tokens is None:
        add_special_tokens = not templated  # a chat template already holds its special tokens
    ids = [list(map(int, row)) for row in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]] \
        if texts else []
    return PromptBatch(texts=texts, ids=ids, templated=templated, add_special_tokens=add_special_tokens)


def completion_from_ids(tokenizer, generated: Sequence[int], stop_ids: Sequence[int], *, prompt_text: str,
                        templated: bool, stopped: bool | None = None) -> Completion:
    """One ``Completion`` from the generated ids, the same way for every engine.

    The reply ends at the first id in ``stop_ids`` (kept out of the text, counted in ``num_tokens``).
    ``stopped=True`` (an engine reporting a stop whose token it did not return) counts one stop token
    after the ids; ``stopped=False`` means the engine hit the token limit.
    """
    row = [int(t) for t in generated]
    stop_set = {int(i) for i in stop_ids}
    at = next((i for i, t in enumerate(row) if t in stop_set), None)
    kept = row if at is None else row[:at]
    finished = at is not None or bool(stopped)
    opened = templated and opens_thinking(prompt_text)
    return Completion(text=tokenizer.decode(kept, skip_special_tokens=True),
                      num_tokens=len(kept) + (1 if finished else 0), finished=finished,
                      thinking_tokens=count_thinking_tokens(tokenizer, kept, opened=opened), thinking_opened=opened)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 512,
                   chat_template: bool = True, add_special_tokens: bool | None = None,
                   sampling: Sampling | None = None, seed: int | None = None) -> list[Completion]:
    """Decode a batch with left padding: greedy by default (deterministic), or sampled.

    The length counted is the number of generated tokens up to and including the first EOS, so a
    model that stops early is not charged for the padding of its batch neighbours. Sampling uses
    ``seed`` (default 0) in a forked RNG, so the same batch with the same seed gives the same replies
    and the caller's random state is left alone.
    """
    if not prompts:
        return []
    check_max_new_tokens(max_new_tokens)
    sampling = sampling or Sampling()
    batch = encode_prompts(tokenizer, prompts, chat_template=chat_template, add_special_tokens=add_special_tokens)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad_id
        enc = tokenizer(batch.texts, return_tensors="pt", padding=True,
                        add_special_tokens=batch.add_special_tokens)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None, pad_token_id=pad_id,
                  **sampling.generate_kwargs())
    if sampling.greedy:
        out = model.generate(**kwargs)
    else:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0 if seed is None else int(seed))
            out = model.generate(**kwargs)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    return [completion_from_ids(tokenizer, row, eos_ids, prompt_text=text_in, templated=batch.templated)
            for text_in, row in zip(batch.texts, new)]


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
