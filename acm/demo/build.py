"""Build the offline demo world: tokenizer, a terse base model and its long-reasoning fine-tune.

Nothing here can be downloaded, so the app's Long-to-Short story is reproduced in miniature and
from scratch, seeded, on CPU:

1. a byte-level BPE tokenizer (numbers below 100 are single tokens) with a tiny chat template;
2. ``tiny-math-base``: a small ``LlamaForCausalLM`` "pre-trained" on worked solutions written as
   plain documents and "instruction-tuned" to answer chats tersely (``A: 13``) - System 1;
3. ``tiny-math-long``: a copy of the base fine-tuned on chats answered in the long style (one
   worked line per step plus a redundant re-check) - System 2;
4. the held-out calibration prompts and evaluation problems as jsonl.

The base learns the worked method as text but not to use it when asked, as a math base model
does; the fine-tune teaches it to reason (at length). That shared ancestry is what makes merging
the two meaningful.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from acm.demo import tasks
from acm.errors import InputError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# One message per role marker; an assistant turn ends with the EOS token so generation stops there.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# GPT-2-like word splitting, with digits cut into pieces of at most two (and their leading space):
# every number the tasks use (0..99) can become one token, as small numbers are in GPT-2's BPE.
_PRETOKEN_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d{1,2}| ?[^\s\w]+|_+|\s+(?!\S)|\s+"""
BASE_NAME, LONG_NAME = "tiny-math-base", "tiny-math-long"
CALIBRATION_NAME, EVAL_NAME = "demo_calibration.jsonl", "demo_eval.jsonl"


@dataclass
class ModelSize:
    """Architecture of the demo models (``LlamaForCausalLM``)."""

    hidden: int = 96
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int = 512
    max_positions: int = 1024


@dataclass
class Phase:
    """One training phase: number of optimiser steps, batch size and peak learning rate."""

    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50


@dataclass
class BuildConfig:
    """Everything that decides the built world; ``quick()`` is the seconds-long variant for tests."""

    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    base: Phase = field(default_factory=lambda: Phase(steps=4500))
    long: Phase = field(default_factory=lambda: Phase(steps=1500, lr=1e-3))
    n_base_docs: int = 6000  # worked solutions as plain text ("pre-training")
    n_base_chat: int = 6000  # chats answered tersely ("instruction tuning")
    n_long_chat: int = 6000  # chats answered at length (the fine-tune)
    n_eval: int = 300
    n_calibration: int = 200
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.5, 1.5)
    threads: int = 2

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(seed=seed, size=ModelSize(hidden=32, layers=4, heads=2, kv_heads=1, intermediate=64, vocab=320),
                   base=Phase(steps=4, batch_size=8, warmup=1), long=Phase(steps=3, batch_size=8, warmup=1),
                   n_base_docs=40, n_base_chat=40, n_long_chat=40, n_eval=20, n_calibration=10)


@dataclass
class BuildReport:
    """What was built and how long it took."""

    out: str
    base: str
    long: str
    calibration: str
    eval: str
    params: int
    seconds: float
    losses: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on the task text; a number below 100 seen in training is one token.

    One token per number keeps the worked solutions short and makes copying an operand from the
    question a one-token copy, which a model this small learns in minutes instead of hours."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  additional_special_tokens=ROLE_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left; training pads by hand
    tok.model_max_length = 1024
    return tok


# ----------------------------------------------------------------------------- data


def prompt_text(question: str) -> str:
    """The chat prompt for a question, exactly as the tokenizer's template renders it."""
    return f"<|user|>{question}\n<|assistant|>"


def _chat_example(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the answer and its EOS are learned."""
    p = tok.encode(prompt_text(question), add_special_tokens=False)
    a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    return p + a, [-100] * len(p) + a


def _doc_example(tok, question: str, text: str) -> tuple[list[int], list[int]]:
    """A worked solution as a plain document; every token is learned."""
    ids = tok.encode(f"Question: {question}\nSolution:\n{text}", add_special_tokens=False) + [tok.eos_token_id]
    return ids, list(ids)


def held_out_sets(cfg: BuildConfig) -> tuple[list[tasks.Problem], list[tasks.Problem]]:
    """Evaluation and calibration problems (disjoint), drawn before any training data."""
    ev = tasks.eval_problems(cfg.n_eval, seed=cfg.seed)
    cal = tasks.calibration_problems(cfg.n_calibration, seed=cfg.seed, exclude={p.key for p in ev})
    return ev, cal


def training_problems(cfg: BuildConfig, exclude: set) -> dict[str, list[tasks.Problem]]:
    """Three disjoint-by-seed training pools, none containing a held-out problem."""
    w = cfg.level_weights
    return {
        "docs": tasks.make_problems(cfg.n_base_docs, seed=30_000 + cfg.seed, exclude=exclude, weights=w, unique=False),
        "short": tasks.make_problems(cfg.n_base_chat, seed=40_000 + cfg.seed, exclude=exclude, weights=w, unique=False),
        "long": tasks.make_problems(cfg.n_long_chat, seed=50_000 + cfg.seed, exclude=exclude, weights=w, unique=False),
    }


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- training


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random,
             pad_id: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless length-bucketed batches (little padding, so CPU time goes into real tokens)."""
    while True:
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(examples[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                x, y = examples[i]
                ids[row, :len(x)] = torch.tensor(x)
                labels[row, :len(y)] = torch.tensor(y)
                mask[row, :len(x)] = 1
            yield ids, labels, mask


def train(model, examples: list, phase: Phase, *, seed: int, pad_id: int, desc: str,
          progress: Progress | None = None, span: tuple[float, float] = (0.0, 1.0),
          show_progress: bool = True) -> list[float]:
    """AdamW with warmup + cosine decay; returns the loss every 50 steps (for the report)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        frac = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, running = [], 0.0
    batches = _batches(examples, phase.batch_size, rng, pad_id)
    bar = tqdm(total=phase.steps, desc=desc, disable=progress is not None or not show_progress)
    for step in range(phase.steps):
        ids, labels, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == phase.steps:
            n = (step % 50) + 1
            losses.append(round(running / n, 4))
            bar.set_postfix(loss=losses[-1])
            running = 0.0
        bar.update(1)
        if progress is not None:
            lo, hi = span
            progress(lo + (hi - lo) * (step + 1) / phase.steps, f"{desc}: step {step + 1}/{phase.steps}")
    bar.close()
    model.eval()
    return losses


def make_model(tok, size: ModelSize, seed: int):
    """A fresh ``LlamaForCausalLM`` sized by ``size`` (untied head, so ``head`` is its own group).

    Llama rather than Qwen2 because transformers 5 loads every ``qwen2`` folder with
    ``Qwen2Tokenizer``, which replaces the saved pre-tokenizer by Qwen's (single digits); a
    ``llama`` folder keeps the ``tokenizer.json`` it was trained with."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


def _save(model, tok, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


# ----------------------------------------------------------------------------- entry point


def build(out: str | os.PathLike, cfg: BuildConfig | None = None, *, progress: Progress | None = None,
          show_progress: bool = True, force: bool = True) -> BuildReport:
    """Rebuild the whole demo world under ``out``: models in ``demo-models/``, data in
    ``calibration/`` and ``eval/`` (the layout of ``assets/``). Returns sizes, losses and time."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    report = progress or (lambda f, d: None)
    try:
        report(0.0, "generating problems")
        ev, cal = held_out_sets(cfg)
        pools = training_problems(cfg, exclude={p.key for p in ev} | {p.key for p in cal})

        corpus = ([p.question for p in pools["docs"]] + [p.cot() for p in pools["docs"][:2000]]
                  + [p.long() for p in pools["long"][:1000]] + [p.short() for p in pools["short"][:1000]]
                  + ["Question:", "Solution:"])
        tok = build_tokenizer(corpus, cfg.size.vocab)

        base_examples = ([_doc_example(tok, p.question, p.cot()) for p in pools["docs"]]
                         + [_chat_example(tok, p.question, p.short()) for p in pools["short"]])
        long_examples = [_chat_example(tok, p.question, p.long()) for p in pools["long"]]

        model = make_model(tok, cfg.size, cfg.seed)
        params = sum(p.numel() for p in model.parameters())
        base_losses = train(model, base_examples, cfg.base, seed=cfg.seed, pad_id=tok.pad_token_id,
                            desc="train base", progress=progress, span=(0.02, 0.7), show_progress=show_progress)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            stage = Path(tmp) / "world"
            _save(model, tok, stage / "demo-models" / BASE_NAME)
            long_losses = train(model, long_examples, cfg.long, seed=cfg.seed + 1, pad_id=tok.pad_token_id,
                                desc="fine-tune long", progress=progress, span=(0.7, 0.98),
                                show_progress=show_progress)
            _save(model, tok, stage / "demo-models" / LONG_NAME)
            write_jsonl(stage / "eval" / EVAL_NAME, [p.to_record() for p in ev])
            write_jsonl(stage / "calibration" / CALIBRATION_NAME,
                        [{"text": p.question, "question": p.question, "answer": str(p.answer), "level": p.level}
                         for p in cal])
            out.mkdir(parents=True, exist_ok=True)
            for sub in ("demo-models/" + BASE_NAME, "demo-models/" + LONG_NAME,
                        "eval/" + EVAL_NAME, "calibration/" + CALIBRATION_NAME):
                src, dst = stage / sub, out / sub
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    if not force:
                        raise InputError(f"{dst} exists; pass --force to overwrite it")
                    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                shutil.move(str(src), str(dst))
        report(1.0, "done")
        return BuildReport(
            out=str(out), base=str(out / "demo-models" / BASE_NAME), long=str(out / "demo-models" / LONG_NAME),
            calibration=str(out / "calibration" / CALIBRATION_NAME), eval=str(out / "eval" / EVAL_NAME),
            params=params, seconds=round(time.perf_counter() - t0, 1),
            losses={"base": base_losses, "long": long_losses})
    finally:
        torch.set_num_threads(old_threads)


def config_with(cfg: BuildConfig, **overrides) -> BuildConfig:
    """``cfg`` with top-level fields replaced (used by the CLI)."""
    return replace(cfg, **overrides)
