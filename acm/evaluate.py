"""Accuracy and response length of causal LMs on question/answer sets (the Long-to-Short metrics).

Greedy decoding (as the paper), batched with left padding, chat template applied when the
tokenizer has one. A reply's length is its generated tokens up to and including EOS. Answers are
compared as numbers when both sides parse as numbers, else as normalised strings.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

from acm.errors import InputError

Progress = Callable[[float, str], None]
ModelSpec = Union[str, os.PathLike, tuple]  # folder, or (name, model, tokenizer)

_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)
_A_COLON = re.compile(r"(?:^|\n|\s)A\s*:\s*\$?\s*(" + _NUM + ")")
_ANY_NUM = re.compile(_NUM)
_NUMBER_ONLY = re.compile(r"^\s*\$?\s*(" + _NUM + r")\s*\.?\s*$")
SAMPLES_KEPT = 5


# ----------------------------------------------------------------------------- answers


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces."""
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


def normalize_number(s: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``; ``"-0"`` -> ``"0"``; non-numbers are returned stripped."""
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return s.strip()
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(text: str | None) -> str | None:
    """The final answer in a reply: ``\\boxed{}`` first, then "answer is X", then "A: X", then the
    last number. Returns a normalised number string (or the boxed text), ``None`` if nothing."""
    if not text:
        return None
    boxed = _boxed(text)
    if boxed is not None:
        m = _NUMBER_ONLY.match(boxed)
        return normalize_number(m.group(1)) if m else boxed
    for pattern in (_ANSWER_IS, _A_COLON):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    nums = _ANY_NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


def gold_answer(raw) -> str:
    """Reference answer: GSM8K's "... #### 42" keeps only 42; numbers are normalised."""
    s = str(raw)
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    boxed = _boxed(s)
    if boxed is not None:
        s = boxed
    return normalize_number(s)


def is_correct(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    try:
        return math.isclose(float(prediction), float(gold), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return prediction.strip().lower() == gold.strip().lower()


# ----------------------------------------------------------------------------- data


def load_data(data: Sequence[dict] | str | os.PathLike, *, field_question: str = "question",
              field_answer: str = "answer", limit: int | None = None) -> list[dict]:
    """Rows ``{question, answer, level?}`` from a list or a ``.jsonl``/``.json`` file."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise InputError(f"data file {path} not found; pass a .jsonl file with question/answer fields")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON lines ({exc}); one JSON object per line expected") from None
        source = str(path)
    else:
        rows, source = list(data), "<list>"
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{source} holds no rows; need a list of objects with question/answer fields")
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict) or field_question not in row or field_answer not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"row {i} of {source} lacks field '{field_question}' or '{field_answer}' "
                             f"(has {keys}); pass --field-question/--field-answer")
        item = {"question": str(row[field_question]), "answer": gold_answer(row[field_answer])}
        if "level" in row:
            item["level"] = str(row["level"])
        out.append(item)
    return out


# ----------------------------------------------------------------------------- models


def load_model(spec: str | os.PathLike, *, trust_remote_code: bool = False, allow_pickle: bool = False,
               device: str | None = None):
    """(model, tokenizer) from a local folder or a Hub id, in eval mode.

    Goes through ``acm.models`` so evaluation gets the same safety rules as analysis and merge
    (safetensors only unless ``allow_pickle``, no model code unless ``trust_remote_code``) and the
    same placement: CUDA in bfloat16 when available, else CPU in float32.
    """
    from acm.models import load_causal_lm, resolve_model

    src = resolve_model(str(spec), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return load_causal_lm(src, device=device)


def _resolve(spec: ModelSpec, **load_options) -> tuple[str, object, object]:
    if isinstance(spec, tuple):
        if len(spec) != 3:
            raise InputError("a model given in memory must be a (name, model, tokenizer) tuple")
        return spec
    model, tok = load_model(spec, **load_options)
    return str(spec), model, tok


# ----------------------------------------------------------------------------- evaluation


def _summary(rows: list[dict]) -> dict:
    lengths = [r["length"] for r in rows]
    acc = sum(r["correct"] for r in rows) / len(rows)
    mean_len = statistics.fmean(lengths)
    return {"accuracy": round(acc, 4), "mean_length": round(mean_len, 2),
            "median_length": float(statistics.median(lengths)), "n": len(rows),
            "accuracy_per_1k_tokens": round(1000 * acc / mean_len, 4) if mean_len else 0.0,
            "truncated": sum(not r["finished"] for r in rows)}


def evaluate_model(model, tokenizer, rows: Sequence[dict], *, name: str = "model", max_new_tokens: int = 512,
                   batch_size: int = 16, chat_template: bool = True, progress: Progress | None = None,
                   show_progress: bool = True, span: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Accuracy, length (mean/median, in tokens) and per-level breakdown of one model on ``rows``."""
    from tqdm.auto import tqdm

    from acm.generation import generate_batch

    if batch_size < 1 or max_new_tokens < 1:
        raise InputError(f"batch size and max new tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    # Similar prompt lengths in one batch: less padding, same greedy results.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["question"]))
    results: list[dict | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=f"eval {Path(name).name}", disable=progress is not None or not show_progress)
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        outs = generate_batch(model, tokenizer, [rows[i]["question"] for i in idx],
                              max_new_tokens=max_new_tokens, chat_template=chat_template)
        for i, comp in zip(idx, outs):
            pred = extract_answer(comp.text)
            results[i] = {"question": rows[i]["question"], "gold": rows[i]["answer"], "prediction": pred,
                          "correct": is_correct(pred, rows[i]["answer"]), "length": comp.num_tokens,
                          "finished": comp.finished, "response": comp.text, "level": rows[i].get("level")}
        done += len(idx)
        bar.update(len(idx))
        if progress is not None:
            lo, hi = span
            progress(lo + (hi - lo) * done / len(rows), f"{Path(name).name}: {done}/{len(rows)}")
    bar.close()
    items = [r for r in results if r is not None]
    out = {"model": name, **_summary(items)}
    levels = sorted({r["level"] for r in items if r["level"] is not None}, key=_level_key)
    if levels:
        out["per_level"] = {lv: _summary([r for r in items if r["level"] == lv]) for lv in levels}
    out["samples"] = [{k: r[k] for k in ("question", "gold", "prediction", "correct", "length", "response")}
                      for r in items[:SAMPLES_KEPT]]
    out["records"] = [{k: r[k] for k in ("prediction", "correct", "length", "finished")} for r in items]
    return out


def _level_key(level: str):
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def evaluate(models: Iterable[ModelSpec], data: Sequence[dict] | str | os.PathLike, *, limit: int | None = None,
             max_new_tokens: int = 512, batch_size: int = 16, field_question: str = "question",
             field_answer: str = "answer", chat_template: bool = True, trust_remote_code: bool = False,
             allow_pickle: bool = False, device: str | None = None, progress: Progress | None = None,
             show_progress: bool = True, keep_records: bool = False) -> dict:
    """Evaluate each model on the same problems; the JSON-ready dict the CLI writes and the UI shows.

    ``models`` are local folders, Hub ids or ``(name, model, tokenizer)`` tuples (e.g. a merge in
    memory). Models are loaded one at a time and released before the next, so only one is resident.
    """
    models = list(models)
    if not models:
        raise InputError("no model to evaluate; pass at least one --model")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    rows = load_data(data, field_question=field_question, field_answer=field_answer, limit=limit)
    result = {"data": str(data) if isinstance(data, (str, os.PathLike)) else "<list>", "n": len(rows),
              "max_new_tokens": max_new_tokens, "decoding": "greedy", "models": []}
    for k, spec in enumerate(models):
        name, model, tok = _resolve(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                    device=device)
        span = (k / len(models), (k + 1) / len(models))
        res = evaluate_model(model, tok, rows, name=name, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             chat_template=chat_template, progress=progress, show_progress=show_progress, span=span)
        del model, tok  # free this model before loading the next
        if not keep_records:
            res.pop("records")
        result["models"].append(res)
    return result


def save_results(result: dict, path: str | os.PathLike) -> None:
    """Write the result JSON atomically (temp file renamed on success)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
