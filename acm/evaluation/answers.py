"""Answer checking for math benchmarks: Hugging Face ``math-verify`` plus a fast path for plain numbers.

Why ``math-verify``: benchmark answers are LaTeX (``\\frac{1}{2}``, ``3\\sqrt 2``, ``(1, 2]``) and
equal answers are written in many ways (``0.5``, ``\\dfrac{1}{2}``, ``50\\%``); math-verify parses
both sides into SymPy and compares them, the checker open-r1 and lighteval use. Home-made regexes
cannot keep up with that.

Why a fast path: the bundled world (and GSM8K) answers with a plain number at a fixed place
("A: 13", "So the answer is 13.", ``\\boxed{13}``). When the gold answer is a plain number and the
reply ends its answer that way, the numbers are compared directly — the same verdict on all 900 demo
replies compared, ~160× faster than math-verify on them (docs/evaluation.md), and the bundled demo
scores stay what they were.

R1-style replies think first (``<think> … </think>``) and then answer: the answer is taken from
after the end of the thinking block. A reply whose thinking block is still open when it hits the
token limit has given no answer: it is wrong, and reported as truncated in thinking.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
# A number that ends the sentence/line: "answer is 13.", "A: 13" (never the 3 of "3/4" or "3 cm").
_END = r"\s*\.?\s*(?:$|\n)"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?\s*(" + _NUM + ")" + _END, re.IGNORECASE)
_A_COLON = re.compile(r"(?:^|\n|\s)A\s*:\s*\$?\s*(" + _NUM + ")" + _END)
_ANY_NUM = re.compile(_NUM)
_NUMBER_ONLY = re.compile(r"^\s*\$?\s*(" + _NUM + r")\s*\.?\s*$")
_PLAIN_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d+)?|\.\d+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# math-verify's own parse/verify timeouts use signal.alarm, which only works in the main thread.
PARSE_TIMEOUT_S = 5
MAX_ANSWER_CHARS = 4000   # parse at most the last 4,000 characters of an answer (a looping reply is long)


# ----------------------------------------------------------------------------- thinking blocks


@dataclass(frozen=True)
class ThinkingSplit:
    """A reply cut at its thinking block. ``thinking`` is None when the reply does not think."""

    thinking: str | None
    answer: str
    closed: bool          # the block was closed (True for replies without one)

    @property
    def thinks(self) -> bool:
        return self.thinking is not None


def split_thinking(reply: str, *, opened: bool = False) -> ThinkingSplit:
    """Split an R1-style reply into its thinking and its answer.

    ``opened``: the prompt already opened the block (DeepSeek-R1-Distill chat templates end the
    generation prompt with ``<think>\\n``, so the reply holds only the closing tag). The answer is
    the text after the last ``</think>``; a block that never closes leaves no answer text.
    """
    reply = reply or ""
    close = reply.rfind(THINK_CLOSE)
    start = reply.find(THINK_OPEN)
    if close >= 0:
        begin = start + len(THINK_OPEN) if 0 <= start < close else 0
        return ThinkingSplit(reply[begin:close], reply[close + len(THINK_CLOSE):], True)
    if start >= 0 or opened:
        begin = start + len(THINK_OPEN) if start >= 0 else 0
        return ThinkingSplit(reply[begin:], "", False)
    return ThinkingSplit(None, reply, True)


# ----------------------------------------------------------------------------- numbers (fast path)


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def _as_number(s: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"`` when ``s`` is a plain number (thousands commas allowed), else None."""
    t = s.strip().replace("$", "").rstrip(".").strip()
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    if not _PLAIN_NUMBER.match(t):
        return None
    value = float(t)
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def normalize_number(s: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``; ``"-0"`` -> ``"0"``; anything else is returned stripped."""
    return _as_number(s) or s.strip()


def fast_number(text: str) -> str | None:
    """The plain-number answer a reply states unambiguously, or None (then math-verify decides).

    Order: the last ``\\boxed{N}``; else the last "answer is N" / "answer: N"; else the last "A: N" —
    each only when N ends the line (so ``3/4``, ``50%`` or ``12 cm`` go to math-verify).
    """
    boxed = _boxed(text)
    if boxed is not None:
        m = _NUMBER_ONLY.match(boxed)
        return _as_number(m.group(1)) if m else None
    for pattern in (_ANSWER_IS, _A_COLON):
        found = pattern.findall(text)
        if found:
            return _as_number(found[-1])
    return None


# ----------------------------------------------------------------------------- math-verify


def _timeout() -> int | None:
    return PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1)
def _configs():
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.ERROR)   # "timeout disabled" notice in threads
    return ([LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()], [LatexExtractionConfig()])


def _parse(text: str, config) -> list:
    from math_verify import parse

    return parse(text, extraction_config=config, parsing_timeout=_timeout())


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's parse of a gold answer string (``\\frac{1}{2}``, ``3\\sqrt 2``, ``(1, 2]``, ``72``)."""
    pred_config, latex_only = _configs()
    parsed = _parse(f"\\boxed{{{gold}}}", latex_only) or _parse(gold, pred_config)
    return tuple(parsed)


def _last_boxed_only(region: str) -> str:
    """Only the last ``\\boxed{}`` of a reply: math-verify joins several boxed answers into one set
    ("\\boxed{5} … no, \\boxed{7}" would become {5, 7}); a grader reads the last one."""
    boxed = _boxed(region)
    return region if boxed is None else f"\\boxed{{{boxed}}}"


def _verify(gold: tuple, pred: list) -> bool:
    from math_verify import verify

    return bool(verify(list(gold), pred, timeout_seconds=_timeout()))


def _shown(parsed: list) -> str | None:
    """The extracted answer as the reply wrote it (math-verify returns [sympy, text])."""
    if not parsed:
        return None
    return str(parsed[-1]) if len(parsed) > 1 else str(parsed[0])


# ----------------------------------------------------------------------------- gold + verdicts


def gold_answer(raw) -> str:
    """Reference answer: GSM8K's "... #### 42" keeps only 42; ``\\boxed{}`` is unwrapped; numbers are normalised."""
    s = str(raw)
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    boxed = _boxed(s)
    if boxed is not None:
        s = boxed
    return normalize_number(s)


@dataclass(frozen=True)
class Verdict:
    """How one reply was scored."""

    correct: bool
    prediction: str | None       # the extracted answer (None: no answer found)
    checker: str                 # "number" (fast path), "math-verify", or "none" (no answer to check)
    thinking: bool = False       # the reply had a thinking block
    truncated_in_thinking: bool = False


def check(reply: str | None, gold: str, *, finished: bool = True, thinking_opened: bool = False,
          fast_path: bool = True) -> Verdict:
    """Score one reply against a gold answer, as a careful grader would.

    ``finished``: the reply ended by itself (EOS) rather than at the token limit. A thinking block
    still open at the token limit means no answer was given: wrong. An R1 reply that ends inside
    its thinking block without closing it is graded on that text (the model stopped there).
    """
    split = split_thinking(reply or "", opened=thinking_opened)
    if not split.closed and not finished:
        return Verdict(False, None, "none", True, True)
    region = split.answer if split.closed else (split.thinking or "")
    region = region[-MAX_ANSWER_CHARS:]
    gold = str(gold).strip()
    gold_num = _as_number(gold)
    if fast_path and gold_num is not None:
        pred = fast_number(region)
        if pred is not None:
            ok = math.isclose(float(pred), float(gold_num), rel_tol=0, abs_tol=1e-6)
            return Verdict(ok, pred, "number", split.thinks)
    if not region.strip():
        return Verdict(False, None, "none", split.thinks)
    pred_config, _ = _configs()
    parsed = _parse(_last_boxed_only(region), pred_config)
    if not parsed:
        return Verdict(False, None, "none", split.thinks)
    gold_parsed = parse_gold(gold)
    ok = _verify(gold_parsed, parsed) if gold_parsed else _shown(parsed) == gold
    return Verdict(ok, _shown(parsed), "math-verify", split.thinks)


def extract_answer(text: str | None, *, thinking_opened: bool = False) -> str | None:
    """The final answer a reply gives (after its thinking block), as written; None if none.

    A plain number from "A: N" / "answer is N" / ``\\boxed{N}`` is normalised (``1,234`` -> ``1234``);
    anything else is what math-verify extracts (``\\frac{1}{2}``); the last number is the fallback.
    """
    if not text:
        return None
    split = split_thinking(text, opened=thinking_opened)
    region = (split.answer if split.closed else split.thinking or "")[-MAX_ANSWER_CHARS:]
    num = fast_number(region)
    if num is not None:
        return num
    boxed = _boxed(region)
    if boxed is not None:
        return normalize_number(boxed)
    shown = _shown(_parse(_last_boxed_only(region), _configs()[0])) if region.strip() else None
    if shown is not None:
        return normalize_number(shown)
    nums = _ANY_NUM.findall(region)
    return normalize_number(nums[-1]) if nums else None


def is_correct(prediction: str | None, gold: str) -> bool:
    """Whether an already-extracted answer equals the gold answer (numbers, then math-verify)."""
    if prediction is None:
        return False
    return check(f"\\boxed{{{prediction}}}", gold).correct
