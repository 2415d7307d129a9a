"""Tuning: sweep t (and the rule's switches, α, density, drop rate, method), stream results, find the
frontier, pick a point.

Why: the paper fixes t = 0.7 for Long-to-Short and reports t = −1.8 elsewhere, so t is a real choice,
and on our demo pair the right setting decides whether ACM helps at all. The default grid is the
paper's rule (``acm.rules.ACM``) at ``DEFAULT_ACM_TS``; this project's softmax rule is a second,
optional rule. ``run_tune`` merges every setting of a grid into a temporary folder,
evaluates it greedily (same prompts and answer extraction as ``acm eval``), removes it, and
appends one JSON line per finished setting to ``tune.jsonl`` — so a killed run resumes where it
stopped. The base and fine-tuned models are evaluated once. At the end (or whenever asked) the
Pareto frontier of accuracy vs mean answer length and a recommended setting under a stated
objective are written to ``frontier.json`` / ``frontier.md``; the recommended setting is then
re-measured on a disjoint held-out split, so the reported number is not the one it was picked on.

A run's settings besides the models, the folder and the grid are one ``TuneOptions`` (``validate()``
gives one line per bad value); ``iter_tune`` / ``run_tune`` also take them as keywords, as they always did.

Everything the evaluator does goes through ``evaluate_rows`` (one small adapter), so the
evaluation module can change underneath without touching the rest of this file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from acm.errors import InputError
from acm.merging import methods as registry

Progress = Callable[[float, str], None]

MAX_SETTINGS = 200                  # a grid larger than this is refused (one line): it would run for hours
ALPHA_RANGE = (0.0, 4.0)            # α in (0, 4]
TUNABLE_METHODS = registry.ACM_METHODS      # every method ACM's λ applies to (acm.merging.methods)
OBJECTIVES = ("shortest", "acc-per-1k", "max-accuracy")
DEFAULT_TOLERANCE = 0.05            # accuracy (fraction) the recommendation may lose vs the fine-tuned model
DEFAULT_HOLDOUT = 0.5
RESULTS_FILE, FRONTIER_JSON, FRONTIER_MD = "tune.jsonl", "frontier.json", "frontier.md"
ROOT = Path(__file__).resolve().parent.parent
SHORT = {k: s.short for k, s in registry.SPECS.items()}
METHOD_ALIASES = registry.ALIASES


# ----------------------------------------------------------------------------- grid

DEFAULT_ACM_TS = (-1.0, 0.5, 0.7, 0.9)     # the paper's t (0.7) inside its ablation (0.5–0.9), and −1 as a contrast
DEFAULT_SOFTMAX_TS = (0.5, 1.0, 2.0, 4.0)  # this project's softmax rule (t ≥ 0; t = 0 is the plain method)
DEFAULT_FIM_TS = (0.5, 1.0, 2.0)           # the data-free fim rule (t ∈ [0, 10]; 1 is its default, 0 is TA at ½)


def _f(v) -> str:
    return "-" if v is None else f"{float(v):g}"


@dataclass(frozen=True)
class Setting:
    """One point of the grid. ``t=None`` is the plain method (λ = α everywhere).

    ``rule`` None (or "softmax") with a t is this project's softmax rule; ``rule="acm"`` is the paper's
    rule (``acm.rules.ACM``) at t with its two switches ``against`` / ``applies``. ``alpha`` is None for
    the paper's setting (against fine-tuned, on task vectors: Eq. 3 has no α); ``estimator`` is set for MI against a plain merge
    only (that setting runs its own analysis; otherwise the tune's analysis fixes the estimator).
    """

    method: str
    alpha: float | None
    t: float | None = None
    density: float | None = None      # TIES / DARE-TIES / Breadcrumbs / DELLA
    drop_rate: float | None = None    # DARE
    rule: str | None = None           # None: plain (t None) or softmax; "acm": the paper's rule; "fim": data-free
    against: str | None = None        # acm rule: MI against "fine-tuned" or "merged"
    applies: str | None = None        # acm rule: λ on "task-vectors" or "merged-delta"
    estimator: str | None = None      # acm rule against merged: its per-sample MI estimator
    metric: str = "nmi"               # softmax: which similarity of the analysis drives λ (acm.activations.similarity)

    @property
    def acm(self) -> bool:
        """λ from a coefficient rule (softmax or the paper's), not the plain α."""
        return self.t is not None

    @property
    def paper(self) -> bool:
        """The paper's rule (``acm``), as opposed to softmax or plain."""
        return self.rule == "acm"

    @property
    def needs_analysis(self) -> bool:
        """Whether the merge takes λ from the tune's analysis (base vs each fine-tuned model)."""
        return self.acm and not (self.paper and self.against == "merged")

    def key(self) -> str:
        """Stable id (used to resume and to pick a point). Plain and softmax keys are as they always
        were (older tune.jsonl files resume); acm-rule keys add the rule and both switches."""
        key = f"{self.method}|a={_f(self.alpha)}|t={_f(self.t)}|d={_f(self.density)}|p={_f(self.drop_rate)}"
        if self.rule == "fim":
            return key + "|r=fim"
        if self.paper:
            key += f"|r=acm|vs={self.against}|on={self.applies}"
            return key + (f"|e={self.estimator}" if self.against == "merged" else "")
        if self.metric != "nmi" and self.acm:
            key += f"|m={self.metric}"
        return key

    def label(self) -> str:
        """``ACM-TIES (d=0.7, t=0.7)`` (the paper's rule), ``ACM-TIES (α=0.7, d=0.7, t=1, softmax)``."""
        name = ("FIM-" if self.rule == "fim" else "ACM-" if self.acm else "") + SHORT.get(self.method, self.method)
        parts = [] if self.alpha is None else [f"α={self.alpha:g}"]
        if self.density is not None:
            parts.append(f"d={self.density:g}")
        if self.drop_rate is not None:
            parts.append(f"p={self.drop_rate:g}")
        if self.t is not None:
            parts.append(f"t={self.t:g}")
        if self.paper:
            if self.against == "merged":
                parts.append(f"vs merged, {self.estimator}")
            if self.applies == "merged-delta":
                parts.append("on merged delta")
        elif self.acm and self.rule != "fim":
            parts.append("softmax" + ("" if self.metric == "nmi" else f" by {self.metric}"))
        return f"{name} ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        """Also reads the old sigmoid rule's settings (rule "sigmoid", θ): that rule is now the acm rule
        with MI against a plain merge and λ on the merged delta (``acm.rules.alias_params``)."""
        def num(k):
            return None if d.get(k) is None else float(d[k])

        rule, t, against, applies, estimator = d.get("rule"), num("t"), d.get("against"), d.get("applies"), \
            d.get("estimator")
        if rule == "sigmoid":
            from acm.rules import alias_params

            sw = alias_params("sigmoid")
            rule, t, against, applies = "acm", num("theta"), sw["against"], sw["applies"]
            estimator = estimator or "labels"
        if rule == "softmax":
            rule = None
        return cls(method=str(d["method"]), alpha=num("alpha"), t=t, density=num("density"),
                   drop_rate=num("drop_rate"), rule=rule, against=against, applies=applies,
                   estimator=estimator if rule == "acm" else None, metric=str(d.get("metric") or "nmi"))

    def merge_options(self, **extra):
        """The ``MergeOptions`` of this point (library defaults for what the grid does not set)."""
        from acm.merging.engine import MergeOptions

        kw: dict[str, Any] = {"method": self.method, "alpha": 1.0 if self.alpha is None else self.alpha}
        if self.density is not None:
            kw["density"] = self.density
        if self.drop_rate is not None:
            kw["drop_rate"] = self.drop_rate
        return MergeOptions(**kw, **extra)


def _values(name: str, values, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> list[float]:
    """Unique, finite, in-range floats in the given order, or one InputError line."""
    if values is None:
        return []
    out: list[float] = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{name}: {v!r} is not a number") from None
        bad = not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi)
        if bad:
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise InputError(f"{name} must be in {rng}, got {v!r}")
        if x not in out:
            out.append(x)
    return out


def parse_values(text: str | Sequence | None) -> list[str]:
    """``"0, 0.5 1"`` → ``["0", "0.5", "1"]`` (text boxes and CLI lists alike)."""
    if text is None:
        return []
    if isinstance(text, str):
        return [p for p in text.replace(",", " ").replace(";", " ").split() if p]
    return [str(p) for p in text]


def _choices(name: str, values, check) -> list[str]:
    out = [check(v) for v in (values or [])]
    if not out:
        raise InputError(f"empty grid: give at least one {name}")
    return list(dict.fromkeys(out))


def _fim_points(rules, ts, fim_ts) -> list[float]:
    """The fim rule's t values of a grid (``fim_ts``, else ``DEFAULT_FIM_TS``), [] without it (``ts`` are the
    acm rule's, often negative)."""
    from acm.rules import RULES, get_rule

    if not any(get_rule(r).key == "fim" for r in rules or ()):
        return []
    lo, hi = RULES["fim"].param("t").range
    return _values("t (fim rule)", fim_ts if fim_ts is not None else DEFAULT_FIM_TS, lo, hi)


def _rule_points(rules, ts, softmax_ts, thetas, against, applies, estimators,
                 metrics) -> tuple[list[tuple[float, str]], list[tuple[float, str, str, str | None]]]:
    """(softmax points (t, metric), acm-rule points (t, against, applies, estimator)) of a grid.

    t per rule: the acm rule takes ``thetas`` (the old sigmoid flag), else ``ts``, else
    ``DEFAULT_ACM_TS``; softmax takes ``softmax_ts``, else ``ts``, else ``DEFAULT_SOFTMAX_TS``. Each t
    is checked against its own rule's range. An alias (``sigmoid``) fixes the switches it stands for.
    """
    from acm.activations.similarity import parse_metrics
    from acm.rules import ACM, RULES, alias_params, get_rule

    combos: list[tuple[str, str]] = []
    use_softmax = False
    for r in rules or ():
        spec, fixed = get_rule(r), alias_params(r)
        if spec.key == "softmax":
            use_softmax = True
            continue
        if spec.key == "fim":              # its t values: _fim_points
            continue
        vs = [fixed["against"]] if "against" in fixed else _choices("MI-against value", against,
                                                                      ACM.param("against").check)
        on = [fixed["applies"]] if "applies" in fixed else _choices("λ-applies value", applies,
                                                                      ACM.param("applies").check)
        combos += [(a, p) for a in vs for p in on if (a, p) not in combos]
    if metrics is not None and not use_softmax and parse_metrics(metrics) != ["nmi"]:
        raise InputError("--metrics picks the softmax rule's similarity; the acm rule uses per-sample MI "
                         "(add softmax to the rules)")

    def grid(rule: str, values, default) -> list[float]:
        lo, hi = RULES[rule].param("t").range
        return _values(f"t ({rule} rule)", default if values is None else values, lo, hi)

    soft = [(t, k) for t in grid("softmax", softmax_ts if softmax_ts is not None else ts, DEFAULT_SOFTMAX_TS)
            for k in parse_metrics(metrics)] if use_softmax else []
    est = _choices("estimator", estimators or ["labels"], ACM.param("estimator").check) \
        if any(a == "merged" for a, _ in combos) else [None]
    acm_ts = grid("acm", thetas if thetas is not None else ts, DEFAULT_ACM_TS) if combos else []
    paper = [(t, a, p, e if a == "merged" else None) for a, p in combos
             for e in (est if a == "merged" else [None]) for t in acm_ts]
    return soft, paper


def _methods(methods) -> list[str]:
    ms: list[str] = []
    for m in methods or []:
        name = METHOD_ALIASES.get(str(m).strip().lower(), str(m).strip().lower())
        if name == "linear":
            raise InputError("linear averaging has no task-vector coefficient to tune; use task_arithmetic, ties, "
                             "dare_ta or dare_ties")
        if name not in TUNABLE_METHODS:
            raise InputError(f"unknown method {m!r}; choose from {', '.join(TUNABLE_METHODS)}")
        if name not in ms:
            ms.append(name)
    if not ms:
        raise InputError("empty grid: give at least one method")
    return ms


def _alpha_free(against: str, applies: str) -> bool:
    """The paper's own setting (Eq. 3) has no α; the other three start from a plain merge at α."""
    return against == "fine-tuned" and applies == "task-vectors"


def expand_grid(methods: Sequence[str], alphas: Sequence, ts: Sequence | None = None, densities: Sequence = (),
                drop_rates: Sequence = (), *, plain: bool = True, rules: Sequence[str] = ("acm",),
                softmax_ts: Sequence | None = None, against: Sequence[str] = ("fine-tuned",),
                applies: Sequence[str] = ("task-vectors",), estimators: Sequence[str] = ("labels",),
                thetas: Sequence | None = None, max_settings: int = MAX_SETTINGS,
                metrics: Sequence[str] | str | None = None, fim_ts: Sequence | None = None) -> list[Setting]:
    """Every (method, α, density/drop rate) plain (if ``plain``) and with each coefficient rule.

    ``rules`` (``acm.rules``): ``acm`` (default, the paper's rule) at each t (``ts``; default
    ``DEFAULT_ACM_TS``, t ∈ [−3, 3]) × ``against`` × ``applies`` (× ``estimators`` for MI against a
    merge); ``softmax`` (this project's rule) at each t (``softmax_ts``, else ``ts``; default
    ``DEFAULT_SOFTMAX_TS``) × ``metrics``; ``sigmoid`` = acm against merged on the merged delta.
    ``fim`` (the data-free rule) at each t (``fim_ts``, else ``ts``; default ``DEFAULT_FIM_TS``), no α.
    ``thetas`` is the old sigmoid flag: the acm rule's t values. The paper's setting (against
    fine-tuned, on task vectors) has no α, so it appears once per (method, density, drop rate). Softmax t = 0 is bit-for-bit the plain
    method, so with ``plain`` it is not run twice. Bad grids raise one InputError line.
    """
    ms = _methods(methods)
    alphas_ = _values("α", alphas, *ALPHA_RANGE, lo_open=True)
    if not alphas_:
        raise InputError("empty grid: give at least one α")
    soft, paper = _rule_points(rules, ts, softmax_ts, thetas, against, applies, estimators, metrics)
    soft = [(t, k) for t, k in soft if not (plain and t == 0)]
    fim = _fim_points(rules, ts, fim_ts)
    if not soft and not paper and not plain and not fim:
        raise InputError("empty grid: give at least one t, or include the plain method")
    dens = _values("density", densities, 0.0, 1.0, lo_open=True)
    drops = _values("drop rate", drop_rates, 0.0, 1.0, hi_open=True)
    if any(registry.SPECS[m].uses("density") for m in ms) and not dens:
        raise InputError(f"empty grid: {' / '.join(SHORT[m] for m in ms if registry.SPECS[m].uses('density'))} "
                         "need at least one density")
    if any(registry.SPECS[m].uses("drop_rate") for m in ms) and not drops:
        raise InputError("empty grid: DARE needs at least one drop rate")
    for m in ms:               # e.g. DELLA: every density ± the default ε must be a probability
        for d in dens if registry.SPECS[m].uses("density") else []:
            registry.validate_options(m, density=d)
    out: list[Setting] = []
    for m in ms:
        d_opts = dens if registry.SPECS[m].uses("density") else [None]
        p_opts = drops if registry.SPECS[m].uses("drop_rate") else [None]
        for i, a in enumerate(alphas_):
            for d in d_opts:
                for p in p_opts:
                    if plain:
                        out.append(Setting(m, a, None, d, p))
                    out += [Setting(m, None if _alpha_free(vs, on) else a, t, d, p, rule="acm", against=vs,
                                    applies=on, estimator=e)
                            for t, vs, on, e in paper if i == 0 or not _alpha_free(vs, on)]
                    out += [Setting(m, a, t, d, p, metric=k) for t, k in soft]
                    out += [Setting(m, None, t, d, p, rule="fim") for t in fim if i == 0]
    out = list({s.key(): s for s in out}.values())
    if max_settings is not None and len(out) > max_settings:
        raise InputError(f"the grid has {len(out)} settings, more than the maximum of {max_settings}; "
                         "use fewer values (or raise --max-settings)")
    return out


# ----------------------------------------------------------------------------- data


def bundled_eval_path() -> Path:
    """The bundled demo evaluation set (``ACM_ASSETS_DIR`` overrides the assets folder, as in the app)."""
    return Path(os.environ.get("ACM_ASSETS_DIR") or ROOT / "assets") / "eval" / "demo_eval.jsonl"


def load_eval_set(source: str | os.PathLike | Sequence[dict] | None = "bundled", *, field_question: str = "question",
                  field_answer: str = "answer", split: str = "test") -> tuple[list[dict], str]:
    """(rows, label): the bundled set, a ``.jsonl``/``.json`` file, a list, or a Hub dataset id."""
    from acm.evaluation.evaluate import load_data

    if source is not None and not isinstance(source, (str, os.PathLike)):
        return load_data(list(source), field_question=field_question, field_answer=field_answer), "<list>"
    spec = "bundled" if source is None else str(source).strip()
    if spec.lower() in ("", "bundled", "demo"):
        path = bundled_eval_path()
        if not path.is_file():
            raise InputError(f"the bundled evaluation set is missing ({path}); pass --data FILE.jsonl")
        return load_data(path), "bundled demo set"
    if os.path.exists(spec) or spec.endswith((".jsonl", ".json")):
        return load_data(spec, field_question=field_question, field_answer=field_answer), spec
    from acm.activations.calibration import check_hub_id

    ident = check_hub_id(spec)
    try:
        import datasets

        ds = datasets.load_dataset(ident, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one line for all
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or "offline" in msg.lower():
            from acm.errors import OfflineError

            raise OfflineError(f"cannot load Hub dataset {ident!r}: offline and not cached; pass a local .jsonl") \
                from None
        raise InputError(f"cannot load Hub dataset {ident!r} (split {split!r}): {type(exc).__name__}: {msg}") from None
    rows = [dict(r) for r in ds]
    return load_data(rows, field_question=field_question, field_answer=field_answer), f"hub:{ident}:{split}"


def split_rows(rows: Sequence[dict], *, holdout: float = DEFAULT_HOLDOUT, limit: int | None = None,
               seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(tune rows, held-out rows): disjoint, seeded, stratified by ``level`` when the data has one.

    ``limit`` first draws that many problems spread evenly over the levels, so a small run still
    sees every difficulty. ``holdout`` 0 returns no held-out rows.
    """
    if not 0 <= holdout < 1:
        raise InputError(f"--holdout must be in [0, 1), got {holdout}")
    if limit is not None and limit < 2 and holdout > 0:
        raise InputError(f"--limit must be at least 2 to leave problems for the held-out split, got {limit}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    rng = random.Random(seed)
    by_level: dict[str, list[dict]] = {}
    for r in rows:
        by_level.setdefault(str(r.get("level", "")), []).append(r)
    for group in by_level.values():
        rng.shuffle(group)
    # Round-robin over levels: any prefix is spread evenly over the difficulties.
    order: list[dict] = []
    queues = [list(g) for _, g in sorted(by_level.items())]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    if limit is not None:
        order = order[:limit]
    if holdout == 0:
        return order, []
    n_hold = max(1, round(len(order) * holdout))
    if n_hold >= len(order):
        raise InputError(f"{len(order)} problem(s) cannot be split into tune and held-out parts; use more problems")
    # Alternate in the round-robin order so both parts keep the level mix.
    step = len(order) / n_hold
    hold_idx = {int(i * step) for i in range(n_hold)}
    hold = [r for i, r in enumerate(order) if i in hold_idx]
    tune = [r for i, r in enumerate(order) if i not in hold_idx]
    return tune, hold


# ----------------------------------------------------------------------------- evaluation adapter


def evaluate_rows(model, rows: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                  chat_template: bool = True, device: str | None = None, engine: str = "transformers") -> dict:
    """THE one call into ``acm.evaluation.evaluate``: accuracy, length and per-level numbers of one model.

    ``model`` is a folder / Hub id, a ``(name, model, tokenizer)`` tuple or a ``(name, engine)`` pair
    (``acm.evaluation.engines``). Greedy, batched, the same prompts and answer extraction as ``acm eval``, with
    the generation ``engine`` asked for (transformers or vllm). Only the keys used here are kept, so a change in
    the evaluator's result dict needs a change in this function only.
    """
    from acm.evaluation.evaluate import evaluate

    res = evaluate([model], list(rows), max_new_tokens=max_new_tokens, batch_size=batch_size,
                   chat_template=chat_template, device=device, show_progress=False, engine=engine)["models"][0]
    acc, mean_len = float(res["accuracy"]), float(res["mean_length"])
    out = {"accuracy": acc, "mean_length": mean_len, "median_length": res.get("median_length"),
           "n": res.get("n", len(rows)), "truncated": res.get("truncated", 0),
           "accuracy_per_1k_tokens": res.get("accuracy_per_1k_tokens",
                                             round(1000 * acc / mean_len, 4) if mean_len else 0.0)}
    out["per_level"] = {str(k): {"accuracy": v["accuracy"], "mean_length": v["mean_length"], "n": v.get("n")}
                        for k, v in (res.get("per_level") or {}).items()}
    return out


def _load(spec: str, device: str | None):
    from acm.checkpoints.models import load_model

    return load_model(spec, device=device)


def _open_reference(spec: str, device: str | None, engine: str) -> tuple:
    """A base / fine-tuned model opened once for both splits: ``(spec, model, tokenizer)`` for
    transformers, ``(spec, engine)`` for vLLM (closed by the caller)."""
    if engine == "transformers":
        model, tok = _load(spec, device)
        return spec, model, tok
    from acm.evaluation.engines import open_engine

    return open_engine(engine, spec, device=device)


def auto_threads(base: str) -> int | None:
    """CPU threads for a tune run: 1 for small models (< 200 MB of weights), else torch's default.

    Why: the demo-size models do too little work per op to split over threads; on a busy 2-core
    machine a second thread makes greedy decoding about 20× slower, not faster (measured).
    """
    p = Path(base)
    if not p.is_dir():
        return None
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return 1 if 0 < size < 200 * 2**20 else None


# ----------------------------------------------------------------------------- frontier + objectives


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """Points not dominated by another (≥ accuracy and ≤ length, one strictly), by length."""
    pts = sorted(points, key=lambda p: (p["mean_length"], -p["accuracy"]))
    front, best = [], -math.inf
    for p in pts:
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def recommend(settings: Sequence[dict], refs: dict, *, objective: str = "shortest",
              tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The recommended setting under ``objective`` (records with accuracy/mean_length), and why.

    * ``shortest``: the shortest answers among settings whose accuracy is ≥ the base model's and
      ≥ the best fine-tuned model's minus ``tolerance``; if none qualifies, the most accurate
      setting, and the report says so.
    * ``acc-per-1k``: the highest accuracy per 1,000 answer tokens.
    * ``max-accuracy``: the highest accuracy (shorter answers break ties).
    Returns ``{"key", "why", "fallback"}`` (key None when there is no setting).
    """
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if not settings:
        return {"key": None, "why": "no setting has finished yet", "fallback": False}
    by_acc = max(settings, key=lambda r: (r["accuracy"], -r["mean_length"]))
    if objective == "max-accuracy":
        return {"key": by_acc["key"], "why": f"highest accuracy ({by_acc['accuracy']:.3f})", "fallback": False}
    if objective == "acc-per-1k":
        best = max(settings, key=lambda r: (1000 * r["accuracy"] / max(r["mean_length"], 1e-9), r["accuracy"]))
        return {"key": best["key"], "fallback": False,
                "why": f"highest accuracy per 1k answer tokens ({1000 * best['accuracy'] / max(best['mean_length'], 1e-9):.1f})"}
    base_acc = refs.get("base", {}).get("accuracy", 0.0)
    ft_acc = max((r["accuracy"] for k, r in refs.items() if k != "base"), default=0.0)
    bar = max(base_acc, ft_acc - tolerance)
    ok = [r for r in settings if r["accuracy"] >= bar - 1e-12]
    if ok:
        best = min(ok, key=lambda r: (r["mean_length"], -r["accuracy"]))
        return {"key": best["key"], "fallback": False,
                "why": f"shortest answers ({best['mean_length']:.1f} tokens) among settings with accuracy ≥ "
                       f"{bar:.3f} (≥ base {base_acc:.3f} and ≥ fine-tuned {ft_acc:.3f} − {tolerance:g})"}
    return {"key": by_acc["key"], "fallback": True,
            "why": f"no setting reached accuracy {bar:.3f} (base {base_acc:.3f}, fine-tuned {ft_acc:.3f} − "
                   f"{tolerance:g}); showing the most accurate one ({by_acc['accuracy']:.3f})"}


# ----------------------------------------------------------------------------- the run


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rows_digest(rows: Sequence[dict]) -> str:
    return _fingerprint({"q": [(r["question"], r["answer"]) for r in rows]})


def read_results(path: str | os.PathLike) -> list[dict]:
    """The records of a ``tune.jsonl``; a half-written last line (a killed run) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(_upgrade(rec))
    return out


def _upgrade(rec: dict) -> dict:
    """An old sigmoid-rule record gets the key its setting has now (the acm rule against a plain merge,
    on the merged delta), so a run written before the rule was renamed resumes; other keys are unchanged."""
    setting = rec.get("setting")
    if isinstance(setting, dict) and setting.get("rule") == "sigmoid":
        s = Setting.from_dict(setting)
        return {**rec, "key": s.key(), "label": s.label(), "setting": s.to_dict(), "old_key": rec.get("key")}
    return rec


class _Stream:
    """Appends one JSON record per line, flushed and fsynced, so a SIGKILL loses at most one line."""

    def __init__(self, path: Path):
        self.path = path
        # A killed run can leave a partial last line: start on a fresh line.
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")

    def write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ensure_analysis(base: str, fts: list[str], analysis, out: Path, *, calibration, samples, device,
                     progress: Progress | None, metrics: Sequence[str] = ("nmi",), sample_mi: bool = False):
    """An ``AnalysisResult`` holding every metric in ``metrics`` (softmax) and, with ``sample_mi``, the
    per-sample MI the acm rule needs: given, loaded from a path, the run folder's cache, or computed
    (and cached) — NMI, the metrics and per-sample MI in one analysis pass."""
    from acm.activations.analysis import AnalysisResult, analyze

    def check(result, where: str):
        missing = [k for k in metrics if k not in result.metrics()]
        if missing:
            raise InputError(f"{where} has no {', '.join(missing)} values (it holds: {', '.join(result.metrics())}); "
                             f"analyse with --metric {','.join(metrics)} or pass another --analysis")
        if sample_mi and not result.has_sample_mi():
            raise InputError(f"{where} has no per-sample MI (made before the paper's rule, or with --mi-estimator "
                             "off); run `acm analyze` again for the acm rule, or tune --rules softmax")
        return result

    def complete(result) -> bool:
        return all(k in result.metrics() for k in metrics) and (not sample_mi or result.has_sample_mi())

    if isinstance(analysis, AnalysisResult):
        return check(analysis, "the given analysis"), "given"
    path = Path(analysis) if analysis else out / "analysis.json"
    if path.is_file():
        result = AnalysisResult.load(path)
        if len(result.models) != len(fts):
            raise InputError(f"{path} covers {len(result.models)} fine-tuned model(s), not {len(fts)}; "
                             "analyse the same models or pass another --analysis")
        if (analysis and path != out / "analysis.json") or complete(result):
            return check(result, str(path)), str(path)
        # the run folder's own cached analysis lacks a metric or per-sample MI: redo it with everything, in one pass
        metrics = list(dict.fromkeys([*result.metrics(), *metrics]))
    result = analyze(base, fts, calibration, samples=samples, device=device, progress=progress,
                     show_progress=progress is None, metrics=list(metrics) or ["nmi"])   # per-sample MI by default
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result, f"computed → {path}"


def _run_config(base: str, fts: list[str], an, settings: Sequence[Setting], **facts) -> dict:
    """What a run's fingerprint covers: models, problems, generation and the analysis λ comes from.
    Keys are those of runs written before the acm rule, plus ``sample_mi`` only when a setting takes
    the paper's λ from the analysis (so older runs keep their fingerprint and resume)."""
    config = {"base": base, "fts": fts, **facts,
              "nmi": None if an is None else [[round(x, 6) for x in m.nmi] for m in an.models]}
    if an is not None and any(s.paper and s.needs_analysis for s in settings):
        config["sample_mi"] = _fingerprint({"mi": [[[round(x, 6) for x in row] for row in m.sample_mi]
                                                   for m in an.models], "info": an.sample_info.get("points")})
    return config


@dataclass
class TuneOptions:
    """Every setting of a tune run besides the models, the run folder and the grid (the CLI's flags, the
    app's controls), checked by ``validate``.

    ``data``: the problems (``load_eval_set``: bundled, a file, rows or a Hub id), split by ``split_rows``
    into tune and held-out parts (``holdout``, ``limit``, ``seed``). ``analysis``: an ``AnalysisResult``,
    a path or None (OUT/analysis.json, computed from ``calibration`` / ``samples`` and cached when missing).
    ``keep`` keeps every merge under OUT; ``restart`` discards OUT/tune.jsonl; ``budget_minutes`` stops
    cleanly between settings; ``threads`` None → ``auto_threads``; ``engine`` generates (transformers, vllm);
    ``executor`` runs the settings (None: here, one after another; ``acm.tune_ray.RayExecutor``: Ray tasks).
    """

    data: str | os.PathLike | Sequence[dict] | None = "bundled"
    field_question: str = "question"
    field_answer: str = "answer"
    split: str = "test"
    limit: int | None = None
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    analysis: Any = None
    calibration: str | None = None
    samples: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 64
    chat_template: bool = True
    objective: str = "shortest"
    tolerance: float = DEFAULT_TOLERANCE
    keep: bool = False
    restart: bool = False
    budget_minutes: float | None = None
    device: str | None = None
    threads: int | None = None
    engine: str = "transformers"
    executor: Any = None        # None: LocalExecutor (this process); acm.tune_ray.RayExecutor: a Ray cluster

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self) -> str:
        """The generation engine's name (``acm.evaluation.engines.check_engine``); one InputError line
        otherwise. Cheap checks only: nothing is loaded."""
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= 1):
            raise InputError(f"--tolerance must be in [0, 1] (accuracy as a fraction), got {self.tolerance}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise InputError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise InputError(f"max new tokens and batch size must be >= 1, got {self.max_new_tokens} and "
                             f"{self.batch_size}")
        if self.keep and getattr(self.executor, "name", "local") != "local":
            raise InputError("--keep keeps every merge under OUT, which only the local executor writes to; "
                             "drop --keep or use --executor local")
        from acm.evaluation.engines import check_engine

        return check_engine(self.engine, device=self.device)


@dataclass
class _Run:
    """One tune run while it goes: what it works on, its two splits, the analysis λ comes from, the
    results file and every record written so far, by (kind, key, split)."""

    base: str
    fts: list[str]
    out: Path
    settings: list[Setting]
    o: TuneOptions
    engine: str
    data_label: str
    tune_rows: list[dict]
    hold_rows: list[dict]
    threads: int | None
    t_start: float
    an: Any = None
    an_label: str | None = None
    stream: _Stream | None = None
    done: dict = field(default_factory=dict)
    resumed: int = 0

    def splits(self) -> list[tuple[str, list[dict]]]:
        return [("tune", self.tune_rows)] + ([("holdout", self.hold_rows)] if self.hold_rows else [])

    def references(self) -> list[tuple[str, str]]:
        """(role, model): ``base``, then ``ft`` (one fine-tuned model) or ``ft0``, ``ft1``, …"""
        return [("base", self.base)] + [(f"ft{i}" if len(self.fts) > 1 else "ft", f) for i, f in enumerate(self.fts)]

    def record(self, rec: dict) -> dict:
        """Append ``rec`` to tune.jsonl and count it as done."""
        self.stream.write(rec)
        self.done[(rec["kind"], rec["key"], rec["split"])] = rec
        return rec

    def measure(self, model, rows: Sequence[dict], *, device: str | None = None) -> dict:
        o = self.o
        return evaluate_rows(model, rows, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size,
                             chat_template=o.chat_template, device=device, engine=self.engine)

    def context(self, rows: Sequence[dict]) -> SettingContext:
        """What each setting of this run needs, as plain values (``run_setting``), measured on ``rows``."""
        o = self.o
        return SettingContext(base=self.base, fts=tuple(self.fts), rows=tuple(rows), analysis=self.an,
                              max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, chat_template=o.chat_template,
                              engine=self.engine, device=o.device, threads=self.threads, calibration=o.calibration,
                              samples=o.samples)

    def executor(self) -> Executor:
        return self.o.executor if self.o.executor is not None else LocalExecutor()

    def report(self) -> dict:
        return build_report(list(self.done.values()), self.settings, objective=self.o.objective,
                            tolerance=self.o.tolerance)


class _Ticker:
    """Progress over the run's units (one evaluation each): a tqdm bar, or the caller's ``progress``
    with an ETA from the mean time per unit so far."""

    def __init__(self, total: int, progress: Progress | None, show_progress: bool):
        from tqdm.auto import tqdm

        self.total, self.finished, self.times, self.progress = max(total, 1), 0, [], progress
        self.bar = tqdm(total=self.total, desc="tune", unit="eval", disable=progress is not None or not show_progress)

    def __call__(self, desc: str, seconds: float | None) -> None:
        self.finished += 1
        if seconds is not None:
            self.times.append(seconds)
        self.bar.update(1)
        if self.progress is not None:
            eta = ""
            if self.times:
                left = (self.total - self.finished) * sum(self.times) / len(self.times)
                eta = f" · ETA {left:.0f} s"
            self.progress(min(1.0, self.finished / self.total), f"{desc} ({self.finished}/{self.total}){eta}")

    def close(self) -> None:
        self.bar.close()


def iter_tune(base: str, fts: Sequence[str], out: str | os.PathLike, settings: Sequence[Setting],
              options: TuneOptions | None = None, *, progress: Progress | None = None, show_progress: bool = True,
              should_stop: Callable[[], bool] | None = None, **overrides: Any) -> Iterator[dict]:
    """Run (or resume) a tune, yielding each record as it is written and finally the report.

    ``overrides`` are ``TuneOptions`` fields, overriding ``options`` (so ``iter_tune(..., limit=8)``
    works as it always did). Order of work: check the options → read and split the problems → the
    analysis (when a setting needs one) → open or resume OUT/tune.jsonl → 1. the base and fine-tuned
    models on both splits → 2. the grid on the tune split → 3. the recommendation on the held-out
    split → the report. Yields ``{"kind": "reference" | "setting" | "holdout", ...}`` records and,
    last, ``{"kind": "report", ...}`` (the ``frontier.json`` content). Closing the generator (a
    cancelled UI job) or ``should_stop()`` returning True stops between settings, removing
    temporary merges.
    """
    run = _start_run(base, fts, out, settings, replace(options or TuneOptions(), **overrides))
    with _torch_threads(run.threads):
        _attach_analysis(run, progress)
        _fetch_models(run, progress, show_progress)
        _open_results(run)
        tick = _Ticker(_units_to_do(run), progress, show_progress)
        try:
            if run.resumed:
                yield {"kind": "resumed", "done": run.resumed, "of": len(run.settings)}
            yield from _reference_records(run, tick)
            stopped = yield from _grid_then_holdout(run, tick, lambda: _stop_reason(run, should_stop))
        finally:
            tick.close()
        yield _final_report(run, stopped)


def _start_run(base, fts: Sequence[str], out: str | os.PathLike, settings: Sequence[Setting],
               o: TuneOptions) -> _Run:
    """Check the grid and the options, read and split the problems, make the run folder (``restart``
    removes its tune.jsonl) and pick the CPU threads."""
    fts, base, settings = [str(f) for f in fts], str(base), list(settings)
    if not settings:
        raise InputError("empty grid: nothing to tune")
    engine = o.validate()
    rows, data_label = load_eval_set(o.data, field_question=o.field_question, field_answer=o.field_answer,
                                     split=o.split)
    tune_rows, hold_rows = split_rows(rows, holdout=o.holdout, limit=o.limit, seed=o.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if o.restart and (out / RESULTS_FILE).exists():
        (out / RESULTS_FILE).unlink()
    t_start = time.perf_counter()
    threads = auto_threads(base) if o.threads is None else o.threads
    return _Run(base=base, fts=fts, out=out, settings=settings, o=o, engine=engine, data_label=data_label,
                tune_rows=tune_rows, hold_rows=hold_rows, threads=threads, t_start=t_start)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's CPU threads set to ``threads`` for the run (if given), restored afterwards."""
    if not threads:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _attach_analysis(run: _Run, progress: Progress | None) -> None:
    """The analysis λ comes from (``_ensure_analysis``), when a setting of the grid needs one."""
    need = [s for s in run.settings if s.needs_analysis]
    if not need:
        return
    o = run.o
    metrics = list(dict.fromkeys(s.metric for s in need if not s.paper and s.rule != "fim"))
    run.an, run.an_label = _ensure_analysis(run.base, run.fts, o.analysis, run.out, calibration=o.calibration,
                                            samples=o.samples, device=o.device, progress=progress, metrics=metrics,
                                            sample_mi=any(s.paper for s in need))
    if any(s.rule == "fim" for s in need) and not run.an.has_fisher():
        _add_fisher(run, progress)


def _add_fisher(run: _Run, progress: Progress | None) -> None:
    """The fim rule's Fisher pass (default settings: 8 × 64 random tokens, seed 0) put into the tune's analysis;
    saved with it when it is the run folder's own (a given file is not rewritten)."""
    import dataclasses

    from acm.activations.fisher import fisher_analysis

    fim = fisher_analysis(run.base, list(run.fts), device=run.o.device, progress=progress)
    run.an = dataclasses.replace(run.an, fisher=fim.fisher)
    own = run.out / "analysis.json"
    if not run.o.analysis or Path(str(run.o.analysis)) == own:
        run.an.save(own)


def _fetch_models(run: _Run, progress: Progress | None, show_progress: bool) -> None:
    """Hub models' weights downloaded once, up front, with progress (after one disk-space check): the
    reference evaluations and every merge of the grid read them."""
    from acm.checkpoints.models import fetch_all, resolve_model

    hub = [s for s in [run.base, *run.fts] if not Path(s).expanduser().exists()]
    if hub:
        fetch_all([resolve_model(s) for s in hub], progress, show_progress=show_progress)


def _open_results(run: _Run) -> None:
    """Start OUT/tune.jsonl with a ``run`` record, or resume it when its fingerprint is this run's
    (another run's file is refused with one line); loads what is done."""
    o = run.o
    config = _run_config(run.base, run.fts, run.an, run.settings, data=run.data_label,
                         tune_rows=_rows_digest(run.tune_rows), holdout_rows=_rows_digest(run.hold_rows),
                         n_tune=len(run.tune_rows), n_holdout=len(run.hold_rows), holdout=o.holdout, limit=o.limit,
                         seed=o.seed, max_new_tokens=o.max_new_tokens, chat_template=o.chat_template, device=o.device)
    if run.engine != "transformers":   # only then: runs written before engines existed keep their fingerprint
        config["engine"] = run.engine
    fp = _fingerprint(config)
    results = run.out / RESULTS_FILE
    previous = read_results(results)
    if previous:
        head = previous[0]
        if head.get("kind") != "run" or head.get("fingerprint") != fp:
            raise InputError(f"{results} holds a tune run with other models, data or settings; "
                             "use another --out or pass --restart to start over")
    run.stream = _Stream(results)
    if not previous:
        run.stream.write({"kind": "run", "fingerprint": fp, "config": config, "engine": run.engine,
                          "started": time.time()})
    run.done = {(r.get("kind"), r.get("key"), r.get("split")): r for r in previous if r.get("kind") != "run"}
    run.resumed = sum(1 for r in previous if r.get("kind") == "setting")


def _units_to_do(run: _Run) -> int:
    """Evaluations left: references per split, settings, and the held-out re-measure."""
    return (sum(1 for k, _ in run.references() for s, _ in run.splits() if ("reference", k, s) not in run.done)
            + sum(1 for s in run.settings if ("setting", s.key(), "tune") not in run.done)
            + (1 if run.hold_rows else 0))


def _stop_reason(run: _Run, should_stop: Callable[[], bool] | None) -> str | None:
    if should_stop is not None and should_stop():
        return "cancelled"
    if run.o.budget_minutes is not None and time.perf_counter() - run.t_start > 60 * run.o.budget_minutes:
        return "budget"
    return None


def _reference_records(run: _Run, tick: _Ticker) -> Iterator[dict]:
    """1. The base and fine-tuned models, each opened once and measured on every split not done yet."""
    for role, spec in run.references():
        pending = [(s, r) for s, r in run.splits() if ("reference", role, s) not in run.done]
        if pending:
            yield from _measure_reference(run, role, spec, pending, tick)


def _measure_reference(run: _Run, role: str, spec: str, pending: list[tuple[str, list[dict]]],
                       tick: _Ticker) -> Iterator[dict]:
    t0 = time.perf_counter()
    loaded = _open_reference(spec, run.o.device, run.engine)
    try:
        for split_name, split_rows_ in pending:
            t1 = time.perf_counter()
            m = run.measure(loaded, split_rows_)
            rec = run.record({"kind": "reference", "key": role, "label": "base" if role == "base" else _short(spec),
                              "model": spec, "split": split_name, **m,
                              "seconds": round(time.perf_counter() - t1, 3)})
            tick(f"{role} on the {split_name} split", time.perf_counter() - t0)
            t0 = time.perf_counter()
            yield rec
    finally:
        if len(loaded) == 2:   # an engine (vLLM) holds the GPU until closed, even on a cancelled run
            loaded[1].close()
        del loaded


def _grid_then_holdout(run: _Run, tick: _Ticker, stop_reason: Callable[[], str | None]):
    """2. and 3. in a fresh temporary folder under OUT (those of a killed run are removed first), removed
    at the end, on a stop and on a cancel alike. Returns why the grid stopped early (None: it did not)."""
    for stale in run.out.glob(".tmp-merges-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=".tmp-merges-", dir=run.out))
    try:
        stopped = yield from _setting_records(run, tmp_root, tick, stop_reason)
        yield from _holdout_records(run, tmp_root, stopped, tick)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return stopped


def _setting_records(run: _Run, tmp_root: Path, tick: _Ticker, stop_reason: Callable[[], str | None]):
    """2. Each setting not done yet, on the run's executor (``LocalExecutor``: one after another here, merged under
    OUT with ``keep``; ``acm.tune_ray.RayExecutor``: as Ray tasks), recorded in the order they finish. The
    executor checks ``stop_reason``; returns it when it stopped the grid."""
    keep = run.o.keep
    todo = [s for s in run.settings if ("setting", s.key(), "tune") not in run.done]
    outcomes = run.executor().run(run.context(run.tune_rows), todo, run.out if keep else tmp_root, stop_reason,
                                  keep=keep)
    try:
        while True:
            try:
                s, res = next(outcomes)
            except StopIteration as end:
                return end.value
            base = {"kind": "setting", "key": s.key(), "label": s.label(), "setting": s.to_dict(), "split": "tune"}
            rec = run.record(_failed_record(base, res) if "failed" in res else {**base, **res})
            tick(s.label(), res.get("seconds"))
            yield rec
    finally:
        outcomes.close()    # a closed run (cancelled UI job, Ctrl-C) cancels what an executor still has running


def _failed_record(base: dict, res: dict) -> dict:
    """A setting the executor could not finish (a worker died past its retries, or the setting raised): kept in
    tune.jsonl with its reason, never on the frontier, and run again by the next resume."""
    return {**base, "kind": "failed", "reason": res["failed"], "attempts": res.get("attempts")}


def _holdout_records(run: _Run, tmp_root: Path, stopped: str | None, tick: _Ticker) -> Iterator[dict]:
    """3. The recommended setting so far, merged again and measured on the held-out split (once; not
    after a cancel, nor without a held-out split), on the run's executor."""
    recommended = run.report()["recommended"]
    key = recommended["key"]
    if not run.hold_rows or key is None or stopped == "cancelled" or ("holdout", key, "holdout") in run.done:
        return
    s = Setting.from_dict(recommended["setting"])
    outcomes = run.executor().run(run.context(run.hold_rows), [s], tmp_root, lambda: None)
    try:
        for _, res in outcomes:
            base = {"kind": "holdout", "key": key, "label": s.label(), "setting": s.to_dict(), "split": "holdout"}
            if "failed" in res:
                rec = run.record(_failed_record(base, res))
            else:   # the same keys as the tune split's metrics (the merge's own facts stay on the setting's record)
                rec = run.record({**base, **{k: v for k, v in res.items() if k not in MERGE_FIELDS}})
            tick(f"{s.label()} on the held-out split", res.get("seconds"))
            yield rec
    finally:
        outcomes.close()


def _final_report(run: _Run, stopped: str | None) -> dict:
    """The report of every record so far, with the run's facts, written to frontier.json / .md."""
    o = run.o
    report = run.report()
    report.update(stopped=stopped, resumed=run.resumed, analysis=run.an_label, data=run.data_label,
                  threads=run.threads, seconds=round(time.perf_counter() - run.t_start, 1),
                  max_new_tokens=o.max_new_tokens, engine=run.engine)
    write_report(report, run.out)
    return {"kind": "report", **report}


def _short(spec: str) -> str:
    s = str(spec).rstrip("/\\")
    return Path(s).name if os.path.sep in s else s


def _merge(base: str, fts: list[str], s: Setting, analysis, where: Path, *, threads, device,
           calibration: str | None = None, samples: int | None = None) -> tuple[Path, dict]:
    """Merge one setting into a fresh folder under ``where``; returns it and the fields the record keeps.

    λ comes from ``acm.rules.coefficients.compute`` (softmax) or ``acm.merging.rule_merge.merge_with_rule`` (the acm
    rule, any switches; it computes λ the same way) — the one path the app and the CLI use too.
    """
    from acm.merging.engine import merge_models

    folder = Path(where) / ("merge-" + "".join(c if c.isalnum() or c in ".-=" else "_" for c in s.key()))
    options = s.merge_options(threads=threads, device=device)
    if s.paper:
        from acm.merging.rule_merge import merge_with_rule

        merged = s.against == "merged"
        aopts = {k: v for k, v in (("samples", samples), ("device", device)) if v is not None}
        res = merge_with_rule(base, fts, folder, options, t=s.t, against=s.against, applies=s.applies,
                              analysis=None if merged else analysis,
                              calibration=(calibration or "bundled") if merged else None,
                              estimator=s.estimator or "labels", analysis_options=aopts, force=True,
                              show_progress=False)
        lam = res.coefficients.mean_over_models()
        return folder, {"rule_lambda": {k: round(v, 6) for k, v in lam.items()}}
    lams = acm = None
    if s.acm:
        from acm.rules.coefficients import compute

        coef = compute(analysis, "fim", s.t) if s.rule == "fim" else \
            compute(analysis, "softmax", s.t, s.alpha, metric=s.metric)
        lams, acm = coef.weights(), coef.entry()
    merge_models(base, fts, folder, options, lambdas=lams, acm=acm, force=True, show_progress=False)
    return folder, {}


# ----------------------------------------------------------------------------- one setting, on any executor

MERGE_FIELDS = ("rule_lambda", "folder", "attempts")   # result fields about the merge / its task, not the metrics


@dataclass(frozen=True)
class SettingContext:
    """What every setting of a run shares, as plain picklable values, so that one setting can run in this process
    or in a worker on another machine (``run_setting``; ``acm.tune_ray``). ``rows``: the split it is measured on;
    ``analysis``: the ``AnalysisResult`` λ comes from (None when no setting needs one)."""

    base: str
    fts: tuple[str, ...]
    rows: tuple[dict, ...]
    analysis: Any = None
    max_new_tokens: int = 256
    batch_size: int = 64
    chat_template: bool = True
    engine: str = "transformers"
    device: str | None = None
    threads: int | None = None
    calibration: str | None = None
    samples: int | None = None


def run_setting(ctx: SettingContext, setting: dict, where: str | None = None, *, keep: bool = False) -> dict:
    """One setting → its result fields (the metrics of ``evaluate_rows``, the merge's facts, ``seconds``).

    Merged into a fresh folder under ``where`` (default: this machine's temporary folder, removed afterwards),
    evaluated on ``ctx.rows``, then removed unless ``keep`` (its path is returned as ``folder``). The models are
    resolved here (a path this machine sees, or the Hub cache). A top-level function of plain arguments, so an
    executor can ship it to another process (``acm.tune_ray``); the local executor calls it directly.
    """
    s = Setting.from_dict(setting)
    t0 = time.perf_counter()
    root = Path(where) if where else Path(tempfile.mkdtemp(prefix="acm-tune-"))
    try:
        with _torch_threads(ctx.threads):
            folder, extra = _merge(ctx.base, list(ctx.fts), s, ctx.analysis, root, threads=ctx.threads,
                                   device=ctx.device, calibration=ctx.calibration, samples=ctx.samples)
            try:
                m = evaluate_rows(str(folder), ctx.rows, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size,
                                  chat_template=ctx.chat_template, device=ctx.device, engine=ctx.engine)
            finally:
                if not keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not where:
            shutil.rmtree(root, ignore_errors=True)
    out = {**m, **extra, "seconds": round(time.perf_counter() - t0, 3)}
    if keep:
        out["folder"] = str(folder)
    return out


class Executor(Protocol):
    """Runs settings and yields ``(setting, result fields)`` in the order they finish; a setting it could not
    finish yields ``{"failed": reason, "attempts": n}``. It calls ``stop()`` while it works and returns its
    reason when that stopped it (None otherwise); closing the generator cancels what it still runs."""

    name: str

    def run(self, ctx: SettingContext, settings: Sequence[Setting], where: Path, stop: Callable[[], str | None], *,
            keep: bool = False) -> Generator[tuple[Setting, dict], None, str | None]: ...


class LocalExecutor:
    """The default: settings one after another in this process (``stop`` checked before each); an error stops
    the run, as it always did."""

    name = "local"

    def run(self, ctx: SettingContext, settings: Sequence[Setting], where: Path, stop: Callable[[], str | None], *,
            keep: bool = False) -> Generator[tuple[Setting, dict], None, str | None]:
        for s in settings:
            reason = stop()
            if reason:
                return reason
            yield s, run_setting(ctx, s.to_dict(), str(where), keep=keep)
        return None


def build_report(records: Sequence[dict], settings: Sequence[Setting] | None = None, *, objective: str = "shortest",
                 tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The frontier report from the records so far (tune split; held-out numbers where measured)."""
    refs = {r["key"]: r for r in records if r.get("kind") == "reference" and r.get("split") == "tune"}
    hold_refs = {r["key"]: r for r in records if r.get("kind") == "reference" and r.get("split") == "holdout"}
    pts = [r for r in records if r.get("kind") == "setting"]
    front_keys = {p["key"] for p in pareto_front(pts)}
    rec = recommend(pts, refs, objective=objective, tolerance=tolerance)
    rows = [{"key": p["key"], "label": p["label"], "setting": p["setting"], "accuracy": p["accuracy"],
             "mean_length": p["mean_length"], "accuracy_per_1k_tokens": p.get("accuracy_per_1k_tokens"),
             "per_level": p.get("per_level", {}), "n": p.get("n"), "on_frontier": p["key"] in front_keys,
             "seconds": p.get("seconds")} for p in pts]
    recommended = {"key": rec["key"], "why": rec["why"], "fallback": rec["fallback"]}
    if rec["key"] is not None:
        p = next(p for p in pts if p["key"] == rec["key"])
        recommended.update(label=p["label"], setting=p["setting"], tune={"accuracy": p["accuracy"],
                                                                          "mean_length": p["mean_length"]})
        h = next((r for r in records if r.get("kind") == "holdout" and r.get("key") == rec["key"]), None)
        if h is not None:
            recommended["holdout"] = {k: h[k] for k in ("accuracy", "mean_length", "n", "per_level") if k in h}
    n_tune = next((r.get("n") for r in refs.values()), None)
    n_hold = next((r.get("n") for r in hold_refs.values()), None)
    return {
        "objective": objective, "tolerance": tolerance, "n_tune": n_tune, "n_holdout": n_hold,
        "grid_size": len(settings) if settings is not None else len(pts), "done": len(pts),
        "complete": settings is not None and all(any(p["key"] == s.key() for p in pts) for s in settings),
        "references": {k: {"label": v.get("label"), "model": v.get("model"),
                           "tune": {"accuracy": v["accuracy"], "mean_length": v["mean_length"]},
                           **({"holdout": {"accuracy": hold_refs[k]["accuracy"],
                                           "mean_length": hold_refs[k]["mean_length"]}} if k in hold_refs else {})}
                       for k, v in refs.items()},
        "frontier": [p["key"] for p in pareto_front(pts)], "settings": rows, "recommended": recommended,
        "failed": _failed(records)}


def _failed(records: Sequence[dict]) -> list[dict]:
    """Settings an executor could not finish (``kind: failed``) and that no later attempt finished: listed with
    their reason; they are not points, so never on the frontier nor recommended."""
    ok = {(r.get("key"), r.get("split")) for r in records if r.get("kind") in ("setting", "holdout")}
    last = {(r.get("key"), r.get("split")): r for r in records if r.get("kind") == "failed"}
    return [{"key": r["key"], "label": r.get("label"), "split": r.get("split"), "reason": r.get("reason"),
             "attempts": r.get("attempts")} for k, r in last.items() if k not in ok]


def report_markdown(report: dict) -> str:
    """``frontier.md``: the held-out result first, then every setting (frontier ones in bold)."""
    lines = [f"# Tune report — objective: {report['objective']} (tolerance {report['tolerance']:g})", ""]
    if report.get("engine"):
        lines += [f"Generation engine: {report['engine']}.", ""]
    r = report["recommended"]
    refs = report["references"]
    if r.get("key"):
        lines.append(f"**Recommended: {r['label']}** — {r['why']}.")
        lines.append("")
        lines.append("| model | tune accuracy | tune length | held-out accuracy | held-out length |")
        lines.append("|---|---|---|---|---|")

        def row(name, d):
            h = d.get("holdout") or {}
            ha = f"{h['accuracy']:.3f}" if h else "–"
            hl = f"{h['mean_length']:.1f}" if h else "–"
            return f"| {name} | {d['tune']['accuracy']:.3f} | {d['tune']['mean_length']:.1f} | {ha} | {hl} |"
        lines.append(row(f"**{r['label']}**", r))
        for k, v in refs.items():
            lines.append(row(v.get("label") or k, v))
        lines.append("")
        if report.get("n_holdout"):
            lines.append(f"Tuned on {report['n_tune']} problems; held-out numbers on {report['n_holdout']} other "
                         "problems (the recommendation was not picked on them).")
        else:
            lines.append(f"Tuned on {report['n_tune']} problems; **no held-out split** (--holdout 0): the numbers "
                         "above are the ones the setting was picked on.")
    else:
        lines.append(f"No recommendation: {r['why']}.")
    stopped = report.get("stopped")
    lines += ["", f"{report['done']} of {report['grid_size']} settings done"
              + (f" (stopped: {stopped})" if stopped else "") + ". Pareto frontier in bold.", "",
              "| setting | accuracy | mean length | acc. per 1k tokens |", "|---|---|---|---|"]
    for s in sorted(report["settings"], key=lambda s: s["mean_length"]):
        name = f"**{s['label']}**" if s["on_frontier"] else s["label"]
        lines.append(f"| {name} | {s['accuracy']:.3f} | {s['mean_length']:.1f} | "
                     f"{s.get('accuracy_per_1k_tokens') or 0:.1f} |")
    failed = report.get("failed") or []
    if failed:
        lines += ["", f"{len(failed)} setting(s) failed (not on the frontier; run the same command again to retry):"]
        lines += [f"- {f['label']} ({f['split']} split): {f['reason']}" for f in failed]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | os.PathLike) -> None:
    """``frontier.json`` + ``frontier.md``, each written atomically."""
    out = Path(out)
    for name, text in ((FRONTIER_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       (FRONTIER_MD, report_markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def run_tune(base: str, fts: Sequence[str], out: str | os.PathLike, settings: Sequence[Setting],
             options: TuneOptions | None = None, *, on_record: Callable[[dict], None] | None = None,
             **kwargs: Any) -> dict:
    """``iter_tune`` run to the end; returns the report (``frontier.json``). ``on_record`` sees every record;
    ``kwargs`` are ``TuneOptions`` fields (overriding ``options``) and ``iter_tune``'s progress arguments."""
    report: dict = {}
    for rec in iter_tune(base, fts, out, settings, options, **kwargs):
        if on_record is not None:
            on_record(rec)
        if rec["kind"] == "report":
            report = rec
    return report
