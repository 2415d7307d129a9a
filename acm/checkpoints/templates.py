"""Tokenizers and chat templates of real model pairs: which one a merged model gets, when a model's
turn ends, and whether a tokenizer's ids fit a model's vocabulary.

Why: the paper's pairs share a vocabulary but not a tokenizer. DeepSeek-R1-Distill-Qwen ships its
own chat template and special tokens (``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``) on Qwen2.5's
151,936-row vocabulary; Qwen2.5-Math speaks ChatML (``<|im_start|>`` … ``<|im_end|>``). A merged
model is saved with exactly one of them (``--tokenizer-from``), and chat / evaluation must prompt
each model with its own template and stop it at its own end-of-turn token.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from acm.errors import InputError

# Files that belong to the tokenizer / chat template / generation defaults of a model folder.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
})
TOKENIZER_SUFFIXES = (".tiktoken",)

# Known end-of-turn markers of chat templates (checked in this order; the first one the template
# uses and the vocabulary holds is the model's end of turn in chat).
_TEMPLATE_FAMILIES = (
    ("<|im_start|>", "<|im_end|>", "ChatML"),
    ("<｜Assistant｜>", "<｜end▁of▁sentence｜>", "DeepSeek-R1"),
    ("<|start_header_id|>", "<|eot_id|>", "Llama 3"),
    ("<start_of_turn>", "<end_of_turn>", "Gemma"),
    ("[INST]", "</s>", "Mistral [INST]"),
)


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES)


def parse_tokenizer_from(value: str | None, n_fts: int) -> int:
    """``base`` → 0, ``ft`` / ``ft:1`` → 1, ``ft:N`` → N (1-based fine-tuned model); one clear line otherwise."""
    text = (value or "base").strip().lower()
    if text == "base":
        return 0
    if text == "ft":
        return 1
    if text.startswith("ft:"):
        try:
            n = int(text[3:])
        except ValueError:
            n = -1
        if 1 <= n <= n_fts:
            return n
        raise InputError(f"--tokenizer-from {value!r}: there are {n_fts} fine-tuned model(s), so use ft:1"
                         + (f" … ft:{n_fts}" if n_fts > 1 else ""))
    raise InputError(f"--tokenizer-from must be base, ft or ft:N (N = 1 … {n_fts}), got {value!r}")


def tokenizer_from_label(index: int) -> str:
    return "base" if index == 0 else f"ft:{index}"


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation defaults of model folder ``src`` into ``dst``."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not path.name.startswith(".") and is_tokenizer_file(path.name):
            shutil.copyfile(path, Path(dst) / path.name)
            copied.append(path.name)
    return copied


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder, or a one-line error naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot load the tokenizer of {Path(path).name}: {str(exc).splitlines()[0]}") from None


class TokenizerFacts:
    """What the merge records and checks about a tokenizer, read from its files without transformers.

    Why: ``AutoTokenizer`` costs a transformers import (~1.5 s of CPU) plus building the Python
    tokenizer, all for four facts — the largest id, the chat template, the eos token and the size.
    ``tokenizer.json`` (read by the Rust ``tokenizers`` package) and ``tokenizer_config.json`` hold
    them. It offers the attributes ``highest_token`` / ``template_family`` read from a tokenizer.
    """

    def __init__(self, vocab: dict[str, int], chat_template, eos_token: str | None, size: int):
        self._vocab, self.chat_template, self.eos_token, self._size = vocab, chat_template, eos_token, size
        self.added_tokens_decoder: dict[int, str] = {}

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def __len__(self) -> int:
        return self._size


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_facts(path: Path) -> TokenizerFacts | None:
    """``TokenizerFacts`` of a folder with a ``tokenizer.json``, or None (then load the real tokenizer)."""
    import json

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        special_file = path / "special_tokens_map.json"
        special = json.loads(special_file.read_text(encoding="utf-8")) if special_file.is_file() else {}
    except Exception:  # noqa: BLE001 - anything unusual: the real tokenizer decides (and words the error)
        return None
    if not isinstance(cfg, dict) or not isinstance(special, dict):
        return None
    vocab = tok.get_vocab(with_added_tokens=True)
    for tok_id, entry in (cfg.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and str(tok_id).isdigit():
            vocab.setdefault(text, int(tok_id))
    jinja = path / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    eos = _token_text(cfg.get("eos_token")) or _token_text(special.get("eos_token"))
    return TokenizerFacts(vocab, template, eos, len(vocab))


def tokenizer_facts(path: Path, *, trust_remote_code: bool = False):
    """Facts of a folder's tokenizer for checks and records: from its files when it has a
    ``tokenizer.json`` and needs no remote code, else the loaded tokenizer itself."""
    facts = None if trust_remote_code else read_tokenizer_facts(path)
    return facts if facts is not None else load_tokenizer(path, trust_remote_code=trust_remote_code)


def highest_token(tokenizer) -> tuple[int, str]:
    """(largest id the tokenizer can produce, that token) — added special tokens included."""
    best_id, best_tok = -1, ""
    for tok_id, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if int(tok_id) > best_id:
            best_id, best_tok = int(tok_id), str(tok)
    vocab = tokenizer.get_vocab()
    if vocab:
        tok, tok_id = max(vocab.items(), key=lambda kv: kv[1])
        if tok_id > best_id:
            best_id, best_tok = int(tok_id), tok
    return best_id, best_tok


def check_tokenizer_fits(tokenizer, rows: int, *, what: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows (generation would index out
    of range, or silently read a row that was never trained)."""
    top, token = highest_token(tokenizer)
    if rows and top >= rows:
        raise InputError(f"{what}: token {token!r} has id {top} but the model has only {rows} embedding rows; "
                         "use a tokenizer that matches this vocabulary")


def template_family(tokenizer) -> str:
    """A short name for the chat template (``ChatML``, ``DeepSeek-R1``, ``Llama 3`` …), ``none`` or ``custom``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    for marker, _, name in _TEMPLATE_FAMILIES:
        if marker in template:
            return name
    return "custom"


def end_of_turn_ids(model: Any, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's and config's eos, the tokenizer's eos, and
    the end-of-turn marker of the chat template when the vocabulary has it (a ChatML base model's eos
    is ``<|endoftext|>``, but in chat its turn ends at ``<|im_end|>``)."""
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(v) for v in template.values())
    for marker, end, _ in _TEMPLATE_FAMILIES:
        if marker in template:
            # one lookup, not get_vocab(): this runs for every chat message and a 150k-entry vocabulary
            # dict costs tens of ms to build; an unknown token maps to unk (or None), hence the round trip
            end_id = tokenizer.convert_tokens_to_ids(end)
            if end_id is not None and tokenizer.convert_ids_to_tokens(end_id) == end:
                ids.append(end_id)
            break
    return sorted({int(i) for i in ids})


def describe_chat(model: Any, tokenizer) -> str:
    """One line for the chat column: the template in use and the tokens that end a turn."""
    ids = end_of_turn_ids(model, tokenizer)
    names = []
    for i in ids:
        token = tokenizer.convert_ids_to_tokens(i)
        names.append(f"{token} ({i})" if token else str(i))
    return f"template: {template_family(tokenizer)} · ends at {', '.join(names) or 'max tokens'}"
