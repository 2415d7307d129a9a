"""Accuracy and response length of causal LMs on question/answer sets (the Long-to-Short metrics).

Decoding is greedy by default (the bundled world; deterministic) or sampled (``temperature`` > 0,
``top_p``, ``samples`` replies per problem, seeded), batched with left padding, through the chat
template when the tokenizer has one. Answers are checked by ``acm.evaluation.answers`` (math-verify, with a
fast path for plain numbers); R1-style replies are graded on what follows their thinking block.

Length, as L2S papers report it: the generated tokens of a reply up to and including EOS. For
models that think, the split: thinking tokens (up to and including ``</think>``) and answer tokens
(the rest). A reply still thinking at the token limit is truncated and wrong, and counted.

``score_predictions`` gives saved replies (generated anywhere, e.g. vLLM) the same checker,
lengths and report; ``evaluate(..., save_replies=...)`` writes replies in that format.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from acm.errors import InputError
from acm.evaluation.answers import (  # noqa: F401 - public API
    check,
    extract_answer,
    gold_answer,
    is_correct,
    normalize_number,
    split_thinking,
)

Progress = Callable[[float, str], None]
ModelSpec = str | os.PathLike | tuple  # folder, (name, model, tokenizer), or (name, opened engine)
SAMPLES_KEPT = 5
SLOW_CPU_TOKENS = 4096   # warn above this many new tokens per reply on CPU
REPLY_FIELDS = ("reply", "response", "completion", "output", "generation")
GOLD_FIELDS = ("gold", "answer", "target")


# ----------------------------------------------------------------------------- data


def _read_rows(path: Path) -> list:
    if not path.is_file():
        raise InputError(f"data file {path} not found; pass a .jsonl file with question/answer fields")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON lines ({exc}); one JSON object per line expected") from None


def load_data(data: Sequence[dict] | str | os.PathLike, *, field_question: str = "question",
              field_answer: str = "answer", field_level: str = "level", limit: int | None = None,
              prompt_template: str | None = None) -> list[dict]:
    """Rows ``{question, answer, level?, prompt?}`` from a list or a ``.jsonl``/``.json`` file.

    ``prompt_template`` (e.g. ``"{question}\\nPlease reason step by step, …"``) sets what the model
    is asked; the gold answer goes through ``gold_answer`` (GSM8K "#### 42" is understood).
    """
    if isinstance(data, (str, os.PathLike)):
        rows, source = _read_rows(Path(data)), str(data)
    else:
        rows, source = list(data), "<list>"
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{source} holds no rows; need a list of objects with question/answer fields")
    if prompt_template is not None and "{question}" not in prompt_template:
        raise InputError("the prompt template must contain {question}")
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict) or field_question not in row or field_answer not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"row {i} of {source} lacks field '{field_question}' or '{field_answer}' "
                             f"(has {keys}); pass --field-question/--field-answer")
        item = {"question": str(row[field_question]), "answer": gold_answer(row[field_answer])}
        if prompt_template is not None:
            item["prompt"] = prompt_template.replace("{question}", item["question"])
        if row.get(field_level) is not None:
            item["level"] = str(row[field_level])
        out.append(item)
    return out


# ----------------------------------------------------------------------------- models


def length_warning(max_new_tokens: int, device: str | None = None) -> str | None:
    """A one-line warning when replies may be long enough to take hours (CPU, > 4,096 new tokens)."""
    if max_new_tokens <= SLOW_CPU_TOKENS:
        return None
    try:
        from acm.checkpoints.models import pick_device

        on_cpu = pick_device(device).type == "cpu"
    except InputError:
        on_cpu = True
    if not on_cpu:
        return None
    return (f"up to {max_new_tokens:,} new tokens per reply on CPU: a reasoning model that uses them can take "
            "minutes per reply and hours per benchmark; use a GPU, a smaller --limit or fewer --max-new-tokens")


# ----------------------------------------------------------------------------- scoring + summaries


def score_reply(reply: str, gold: str, *, num_tokens: int, finished: bool, thinking_tokens: int = 0,
                thinking_opened: bool = False, fast_path: bool = True) -> dict:
    """One reply's record: verdict, extracted answer, total / thinking / answer tokens, truncation."""
    v = check(reply, gold, finished=finished, thinking_opened=thinking_opened, fast_path=fast_path)
    thinking_tokens = min(int(thinking_tokens), int(num_tokens)) if v.thinking else 0
    return {"prediction": v.prediction, "correct": v.correct, "checker": v.checker, "length": int(num_tokens),
            "thinking_tokens": thinking_tokens, "answer_tokens": int(num_tokens) - thinking_tokens,
            "thinks": v.thinking, "finished": bool(finished), "truncated_in_thinking": v.truncated_in_thinking}


def _summary(recs: list[dict]) -> dict:
    lengths = [r["length"] for r in recs]
    acc = sum(r["correct"] for r in recs) / len(recs)
    mean_len = statistics.fmean(lengths)
    thinks = any(r["thinks"] for r in recs)
    out = {"accuracy": round(acc, 4), "mean_length": round(mean_len, 2),
           "median_length": float(statistics.median(lengths)), "n": len({r["index"] for r in recs}),
           "replies": len(recs),
           "accuracy_per_1k_tokens": round(1000 * acc / mean_len, 4) if mean_len else 0.0,
           "truncated": sum(not r["finished"] for r in recs),
           "truncated_in_thinking": sum(r["truncated_in_thinking"] for r in recs),
           "thinks": thinks,
           "mean_thinking_length": round(statistics.fmean(r["thinking_tokens"] for r in recs), 2) if thinks else None,
           "mean_answer_length": round(statistics.fmean(r["answer_tokens"] for r in recs), 2) if thinks else None}
    return out


def _level_key(level: str):
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def summarize(records: list[dict], *, name: str, samples: int = 1, sampling: dict | None = None,
              keep_records: bool = False) -> dict:
    """The per-model report from reply records: overall, per level, per sample, sample replies."""
    out = {"model": name, **_summary(records), "samples_per_problem": samples,
           "decoding": sampling or {"mode": "greedy"},
           "checker": dict(Counter(r["checker"] for r in records))}
    if samples > 1:
        per = [sum(r["correct"] for r in records if r["sample"] == s) / max(1, sum(r["sample"] == s for r in records))
               for s in range(samples)]
        out["accuracy_per_sample"] = [round(a, 4) for a in per]
        out["accuracy_std"] = round(statistics.pstdev(per), 4)
    levels = sorted({r["level"] for r in records if r.get("level") is not None}, key=_level_key)
    if levels:
        out["per_level"] = {lv: _summary([r for r in records if r.get("level") == lv]) for lv in levels}
    out["samples"] = [{k: r[k] for k in ("question", "gold", "prediction", "correct", "length", "thinking_tokens",
                                         "finished", "response")}
                      for r in records[:SAMPLES_KEPT]]
    if keep_records:
        out["records"] = [{k: r[k] for k in ("index", "sample", "prediction", "correct", "checker", "length",
                                             "thinking_tokens", "answer_tokens", "finished", "truncated_in_thinking")}
                          for r in records]
    return out


# ----------------------------------------------------------------------------- generation


def evaluate_model(model, tokenizer, rows: Sequence[dict], *, name: str = "model", max_new_tokens: int = 512,
                   batch_size: int = 16, chat_template: bool = True, sampling=None, samples: int = 1,
                   seed: int = 0, fast_path: bool = True, keep_records: bool = False,
                   replies: list | None = None, progress: Progress | None = None, show_progress: bool = True,
                   span: tuple[float, float] = (0.0, 1.0), engine=None) -> dict:
    """Accuracy, length (total, and thinking / answer for models that think) and per-level breakdown
    of one model on ``rows``; with sampling, ``samples`` seeded replies per problem (accuracy = mean).

    ``replies``: a list that receives one saved-reply dict per generation (``save_replies`` format).
    ``engine``: an opened ``acm.evaluation.engines`` engine (e.g. vLLM); default: transformers on ``model``.
    """
    from tqdm.auto import tqdm

    from acm.evaluation.engines import TransformersEngine
    from acm.evaluation.generation import Sampling, check_max_new_tokens, seed_for

    engine = engine or TransformersEngine(model, tokenizer)
    sampling = sampling or Sampling()
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    check_max_new_tokens(max_new_tokens)
    if samples < 1 or (samples > 1 and sampling.greedy):
        raise InputError(f"--samples {samples}: need 1, or more than 1 with --temperature > 0 "
                         "(greedy decoding gives the same reply every time)")
    # Similar prompt lengths in one batch: less padding, same greedy results.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].get("prompt") or rows[i]["question"]))
    if engine.whole_set_per_call:   # vLLM batches on its own; one call per sample gives it every prompt
        batch_size = max(1, len(order))
    total = len(rows) * samples
    records: list[dict] = []
    bar = tqdm(total=total, desc=f"eval {Path(name).name}", disable=progress is not None or not show_progress)
    done = 0
    for s in range(samples):
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            outs = engine.generate([rows[i].get("prompt") or rows[i]["question"] for i in idx],
                                   max_new_tokens=max_new_tokens, chat_template=chat_template, sampling=sampling,
                                   seed=seed_for(seed, s, b))
            for i, comp in zip(idx, outs):
                rec = score_reply(comp.text, rows[i]["answer"], num_tokens=comp.num_tokens, finished=comp.finished,
                                  thinking_tokens=comp.thinking_tokens, thinking_opened=comp.thinking_opened,
                                  fast_path=fast_path)
                records.append({"index": i, "sample": s, "question": rows[i]["question"], "gold": rows[i]["answer"],
                                "level": rows[i].get("level"), "response": comp.text, **rec})
                if replies is not None:
                    replies.append({"model": name, "index": i, "question": rows[i]["question"], "gold": rows[i]["answer"],
                                    "level": rows[i].get("level"), "sample": s, "reply": comp.text,
                                    "num_tokens": comp.num_tokens, "thinking_tokens": comp.thinking_tokens,
                                    "finished": comp.finished, "thinking_opened": comp.thinking_opened})
            done += len(idx)
            bar.update(len(idx))
            if progress is not None:
                lo, hi = span
                progress(lo + (hi - lo) * done / total, f"{Path(name).name}: {done}/{total}")
    bar.close()
    records.sort(key=lambda r: (r["sample"], r["index"]))
    return summarize(records, name=name, samples=samples, sampling=sampling.to_dict(), keep_records=keep_records)


def evaluate(models: Iterable[ModelSpec], data: Sequence[dict] | str | os.PathLike | None = None, *,
             preset: str | None = None, preset_source: str | os.PathLike | None = None,
             limit: int | None = None, max_new_tokens: int = 512, batch_size: int = 16,
             field_question: str = "question", field_answer: str = "answer", prompt_template: str | None = None,
             chat_template: bool = True, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, samples: int = 1, seed: int = 0, use_generation_config: bool = False,
             fast_path: bool = True, save_replies: str | os.PathLike | None = None,
             trust_remote_code: bool = False, allow_pickle: bool = False, device: str | None = None,
             progress: Progress | None = None, show_progress: bool = True, keep_records: bool = False,
             engine: str = "transformers") -> dict:
    """Evaluate each model on the same problems; the JSON-ready dict the CLI writes and the UI shows.

    ``models`` are local folders, Hub ids or ``(name, model, tokenizer)`` tuples (e.g. a merge in
    memory). Models are loaded one at a time and released before the next, so only one is resident.
    Problems come from ``data`` (file or rows) or a benchmark ``preset`` (``acm.evaluation.presets``).
    Decoding: greedy unless ``temperature`` > 0; ``use_generation_config`` takes each model's own
    ``generation_config.json`` sampling (explicit ``temperature``/``top_p``/``top_k`` still win).
    ``engine``: ``transformers`` (default) or ``vllm`` (optional, CUDA; ``acm.evaluation.engines``) — same prompts,
    stop ids and grading; ``models`` may also hold ``(name, engine)`` pairs opened by the caller.
    """
    from acm.evaluation.engines import check_engine, engine_record, open_engine
    from acm.evaluation.generation import Sampling, check_max_new_tokens, sampling_from_model

    models = list(models)
    if not models:
        raise InputError("no model to evaluate; pass at least one --model")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"--samples must be an integer >= 1, got {samples!r}")
    check_max_new_tokens(max_new_tokens)
    engine = check_engine(engine, device=device)
    override = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    fixed = None if use_generation_config else Sampling(
        temperature=0.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k)
    if fixed is not None and samples > 1 and fixed.greedy:
        raise InputError(f"--samples {samples} needs --temperature > 0 (greedy decoding gives the same reply every time)")
    rows, label = _problems(data, preset, preset_source, limit=limit, field_question=field_question,
                            field_answer=field_answer, prompt_template=prompt_template)
    result = {"data": label, "n": len(rows), "max_new_tokens": max_new_tokens,
              "decoding": fixed.to_dict() if fixed is not None else {"mode": "generation_config", **{
                  k: v for k, v in override.items() if v is not None}},
              "samples_per_problem": samples, "seed": seed, "engine": engine_record(engine), "models": []}
    warning = length_warning(max_new_tokens, device)
    if warning:
        result["warnings"] = [warning]
    saved: list[dict] | None = [] if save_replies is not None else None
    for k, spec in enumerate(models):
        owned = not (isinstance(spec, tuple) and len(spec) == 2)   # an engine the caller opened stays open
        name, eng = open_engine(engine, spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                device=device, seed=seed, progress=progress)
        try:
            sampling = fixed if fixed is not None else sampling_from_model(eng.model, override)
            if samples > 1 and sampling.greedy:
                raise InputError(f"{name}: its generation_config asks for greedy decoding, so --samples {samples} "
                                 "would repeat one reply; pass --temperature")
            span = (k / len(models), (k + 1) / len(models))
            res = evaluate_model(None, None, rows, name=name, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 chat_template=chat_template, sampling=sampling, samples=samples, seed=seed,
                                 fast_path=fast_path, keep_records=keep_records, replies=saved, progress=progress,
                                 show_progress=show_progress, span=span, engine=eng)
        finally:
            if owned:
                eng.close()  # free this model before loading the next
        result["models"].append(res)
    if save_replies is not None:
        write_jsonl(saved or [], save_replies)
        result["replies_file"] = str(save_replies)
    return result


def _problems(data, preset, preset_source, *, limit, field_question, field_answer, prompt_template):
    if preset is not None:
        if data is not None:
            raise InputError("pass either --data or --preset, not both")
        from acm.evaluation.presets import get_preset, load_preset

        p = get_preset(preset)
        rows = load_preset(p, source=preset_source, limit=limit)
        if prompt_template is not None:
            rows = [{**r, "prompt": prompt_template.replace("{question}", r["question"])} for r in rows]
        return rows, f"{p.hub_id} ({p.split})"
    if data is None:
        raise InputError("no problems: pass --data FILE.jsonl or --preset NAME")
    rows = load_data(data, field_question=field_question, field_answer=field_answer, limit=limit,
                     prompt_template=prompt_template)
    return rows, str(data) if isinstance(data, (str, os.PathLike)) else "<list>"


# ----------------------------------------------------------------------------- saved predictions


def _first(row: dict, names: Sequence[str]):
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def score_predictions(path: str | os.PathLike, *, tokenizer: str | None = None, max_new_tokens: int | None = None,
                      limit: int | None = None, fast_path: bool = True, keep_records: bool = False,
                      trust_remote_code: bool = False) -> dict:
    """Score saved replies (``.jsonl``: question, gold, reply per line) with the evaluator's checker,
    lengths and report — for generations made elsewhere (vLLM on a cluster) or by ``save_replies``.

    Optional fields per line: ``model`` (one report per model), ``level``, ``sample``, ``num_tokens``,
    ``thinking_tokens``, ``finished``, ``thinking_opened``. Token counts come from the file, else
    from ``tokenizer`` (a model folder or Hub id; + 1 for the EOS of a finished reply). When
    ``finished`` is missing, a reply is truncated if it used ``max_new_tokens`` or stops inside an
    unclosed thinking block.
    """
    rows = _read_rows(Path(path))
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path} holds no replies; one JSON object per line with question, gold, reply")
    tok = _load_tokenizer(tokenizer, trust_remote_code) if tokenizer else None
    template_opens = False
    if tok is not None:
        from acm.evaluation.generation import build_prompt, opens_thinking

        try:
            template_opens = opens_thinking(build_prompt(tok, "x"))
        except Exception:  # noqa: BLE001 - a broken template only loses this hint
            template_opens = False
    by_model: dict[str, list[dict]] = {}
    index: dict[str, dict[tuple, int]] = {}
    default_name = Path(path).stem
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"line {i + 1} of {path} is not a JSON object")
        reply, gold = _first(row, REPLY_FIELDS), _first(row, GOLD_FIELDS)
        if reply is None or gold is None:
            raise InputError(f"line {i + 1} of {path} lacks a reply or gold answer (has {sorted(row)}); "
                             f"need one of {list(REPLY_FIELDS)} and one of {list(GOLD_FIELDS)}")
        reply, gold = str(reply), gold_answer(gold)
        name = str(row.get("model") or default_name)
        question = str(row.get("question", ""))
        recs = by_model.setdefault(name, [])
        seen = index.setdefault(name, {})
        key = ("index", row["index"]) if row.get("index") is not None else (question, gold)
        problem = seen.setdefault(key, len(seen))
        if limit and problem >= limit:
            continue
        opened = bool(row.get("thinking_opened", template_opens))
        num_tokens, thinking = row.get("num_tokens"), row.get("thinking_tokens")
        finished = row.get("finished")
        if num_tokens is None or (thinking is None and "</think>" in reply):
            if tok is None:
                raise InputError(f"line {i + 1} of {path} has no num_tokens/thinking_tokens; pass --tokenizer MODEL "
                                 "to count tokens")
            n_reply = len(tok(reply, add_special_tokens=False)["input_ids"])
            split = split_thinking(reply, opened=opened)
            if num_tokens is None:
                num_tokens = n_reply + (1 if finished is not False and split.closed else 0)
            if thinking is None:
                if split.thinks and split.closed:
                    cut = reply.rfind("</think>") + len("</think>")
                    thinking = len(tok(reply[:cut], add_special_tokens=False)["input_ids"])
                else:
                    thinking = n_reply if split.thinks else 0
        if finished is None:
            hit_limit = max_new_tokens is not None and int(num_tokens) >= max_new_tokens
            finished = not hit_limit and split_thinking(reply, opened=opened).closed
        rec = score_reply(reply, gold, num_tokens=int(num_tokens), finished=bool(finished),
                          thinking_tokens=int(thinking or 0), thinking_opened=opened, fast_path=fast_path)
        recs.append({"index": problem, "sample": int(row.get("sample", 0) or 0), "question": question, "gold": gold,
                     "level": None if row.get("level") is None else str(row["level"]), "response": reply, **rec})
    result = {"data": str(path), "predictions": True, "n": 0, "models": []}
    for name, recs in by_model.items():
        if not recs:
            continue
        samples = max(r["sample"] for r in recs) + 1
        recs.sort(key=lambda r: (r["sample"], r["index"]))
        result["models"].append(summarize(recs, name=name, samples=samples, sampling={"mode": "from file"},
                                          keep_records=keep_records))
    result["n"] = max((m["n"] for m in result["models"]), default=0)
    return result


def _load_tokenizer(spec: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - many failure types; one line
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load tokenizer {spec!r}: {msg}") from None


# ----------------------------------------------------------------------------- files


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON lines atomically (temp file renamed on success)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_results(result: dict, path: str | os.PathLike) -> None:
    """Write the result JSON atomically (temp file renamed on success)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
