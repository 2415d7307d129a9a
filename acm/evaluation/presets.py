"""Benchmark presets: the reasoning benchmarks the L2S / ACM papers report, as public Hub datasets.

Each preset names the Hub dataset, config and split, which fields hold the question, the gold
answer and the difficulty level, and the prompt the Long-to-Short literature uses (the DeepSeek-R1
/ Qwen2.5-Math instruction "Please reason step by step, and put your final answer within
\\boxed{}."). Ids and fields were checked against the datasets' cards:

- ``openai/gsm8k`` config ``main``, split ``test`` (1,319): ``question``, ``answer`` ("… #### 72")
- ``HuggingFaceH4/MATH-500`` split ``test`` (500): ``problem``, ``answer`` (LaTeX), ``level`` (1–5), ``subject``
- ``HuggingFaceH4/aime_2024`` split ``train`` (30): ``problem``, ``answer`` (an integer as text)
- ``math-ai/minervamath`` split ``test`` (272): ``question``, ``answer`` (LaTeX)

Loading is ``datasets.load_dataset(hub_id, config, split=...)``; ``source`` points the same call
at a local copy (a folder laid out like the Hub repository), which is how the tests run offline.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from acm.errors import InputError, OfflineError

BOXED_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class Preset:
    """Where a benchmark lives on the Hub and how to read and prompt it."""

    key: str
    title: str
    hub_id: str
    split: str
    question: str
    answer: str
    config: str | None = None
    level: str | None = None
    prompt: str = BOXED_PROMPT
    size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {p.key: p for p in (
    Preset("gsm8k", "GSM8K (test, 1,319)", "openai/gsm8k", "test", "question", "answer", config="main", size=1319),
    Preset("math500", "MATH-500 (test, 500, levels 1–5)", "HuggingFaceH4/MATH-500", "test", "problem", "answer",
           level="level", size=500),
    Preset("aime24", "AIME 2024 (30)", "HuggingFaceH4/aime_2024", "train", "problem", "answer", size=30),
    Preset("minerva", "Minerva Math (test, 272)", "math-ai/minervamath", "test", "question", "answer", size=272),
)}


def get_preset(key: str) -> Preset:
    """The preset called ``key`` (case-insensitive; ``math-500`` and ``math500`` both work)."""
    def norm(s: str) -> str:
        return (s or "").strip().lower().replace("-", "").replace("_", "").replace(" ", "")

    for k, p in PRESETS.items():
        if norm(key) in (k, norm(p.hub_id)):
            return p
    raise InputError(f"unknown benchmark preset {key!r}; choose one of {', '.join(PRESETS)}")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_preset(key: str | Preset, *, source: str | os.PathLike | None = None, limit: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{question, prompt, answer, level?}`` of a benchmark preset, loaded with ``datasets``.

    ``source``: a local folder with the same layout as the Hub repository (a mirror, or the tests'
    fixtures) used in place of the Hub id; everything else (config, split, fields) is the preset's.
    ``cache_dir``: where ``datasets`` keeps its cache (default: its own).
    """
    from acm.evaluation.answers import gold_answer

    preset = key if isinstance(key, Preset) else get_preset(key)
    target = preset.hub_id
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise InputError(f"preset source {path} is not a folder; pass a local copy of {preset.hub_id}")
        target = str(path.resolve())
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a requirement
        raise InputError("benchmark presets need the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(target, preset.config, split=preset.split,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one line each
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        name = type(exc).__name__
        if source is None and (_hub_offline() or "offline" in msg.lower() or "Connect" in name or "Connect" in msg):
            raise OfflineError(f"cannot load {preset.hub_id} ({preset.title}): the Hub is unreachable or offline "
                               "mode is set, and it is not cached; use a local copy (CLI: --preset-source DIR)") from None
        raise InputError(f"cannot load {preset.hub_id} split {preset.split!r}: {name}: {msg}") from None
    columns = set(ds.column_names)
    missing = [f for f in (preset.question, preset.answer, preset.level) if f and f not in columns]
    if missing:
        raise InputError(f"{preset.hub_id} has no field(s) {missing} (has {sorted(columns)}); the dataset changed")
    n = len(ds) if not limit else min(limit, len(ds))
    rows = []
    for i in range(n):
        rec = ds[i]
        question = str(rec[preset.question])
        row = {"question": question, "prompt": preset.prompt.format(question=question),
               "answer": gold_answer(rec[preset.answer])}
        if preset.level and rec.get(preset.level) is not None:
            row["level"] = str(rec[preset.level])
        rows.append(row)
    if not rows:
        raise InputError(f"{preset.hub_id} split {preset.split!r} is empty")
    return rows
