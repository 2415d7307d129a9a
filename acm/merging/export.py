"""Model card (README.md) and recipe (acm_recipe.json) of a merged model.

Why: a merged checkpoint is only useful if one can tell what it is and redo it. The recipe is the
machine-readable record (sources with commits, method, options, λ per group and model, the ACM
analysis provenance, package version); the model card is the same for people, with Hub metadata
in its YAML front matter. Neither contains the temp folder the merge was written into; the card
names local model folders by their folder name only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from acm.merging.methods import OPTIONS, SPECS
from acm.sizes import format_bytes

# Derived from the registry (acm.merging.methods); kept as names for callers that read them.
FORMULAS = {k: m.formula for k, m in SPECS.items()}
METHOD_NAMES = {k: m.label for k, m in SPECS.items()}
_RELEVANT = {k: m.options for k, m in SPECS.items()}


def _is_local(spec: str) -> bool:
    return os.path.isabs(spec) or spec.startswith((".", "~")) or Path(spec).expanduser().exists()


def display_name(spec: str) -> str:
    """Hub ids as they are; local folders by their folder name (no machine paths in a public card)."""
    return Path(spec).expanduser().name if _is_local(spec) else spec


def _source(src: Any) -> dict:
    if isinstance(src, dict):
        return dict(src)
    prov = src.provenance() if hasattr(src, "provenance") else {"model": str(src)}
    prov["local"] = _is_local(prov["model"])
    return prov


def build_recipe(base: Any, fts: list[Any], options: Any, lambdas: list[dict[str, float]], *,
                 groups: list[str] | None = None, acm: dict | None = None, vocab_notes: list[str] | None = None,
                 stats: dict | None = None, version: str | None = None, out_name: str | None = None) -> dict:
    """The full, JSON-serialisable record of one merge (written as ``acm_recipe.json``)."""
    if version is None:
        from acm import __version__ as version
    opts = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    sources = [_source(f) for f in fts]
    groups = list(groups or (list(lambdas[0]) if lambdas else []))
    acm_block = None
    if acm:
        acm_block = {k: acm.get(k) for k in ("t", "alpha", "clip") if k in acm}
        if acm.get("analysis") is not None:
            acm_block["analysis"] = acm["analysis"]
        for k, v in acm.items():
            acm_block.setdefault(k, v)
    return json.loads(json.dumps({
        "tool": "ACM Merge Explorer",
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "name": out_name,
        "method": opts.get("method"),
        "acm": acm_block is not None,
        "base": _source(base),
        "models": sources,
        "options": opts,
        "groups": groups,
        "lambdas": [{"model": s["model"], "lambda": {g: lam.get(g) for g in [*groups, *(k for k in lam if k not in groups)]}}
                    for s, lam in zip(sources, lambdas)],
        "acm_analysis": acm_block,
        "vocab_notes": list(vocab_notes or []),
        "output": dict(stats or {}),
        "formula": FORMULAS.get(opts.get("method"), ""),
    }, default=str))


def recipe(report: Any) -> dict:
    """The recipe of a finished merge, from a ``MergeReport`` or its ``to_dict()``."""
    rec = report.get("recipe") if isinstance(report, dict) else getattr(report, "recipe", None)
    if rec:
        return json.loads(json.dumps(rec, default=str))
    data = report if isinstance(report, dict) else report.to_dict()
    out_dir = data.get("out_dir")
    if out_dir and (Path(out_dir) / "acm_recipe.json").is_file():
        return json.loads((Path(out_dir) / "acm_recipe.json").read_text(encoding="utf-8"))
    raise ValueError("this merge report carries no recipe")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "—"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lambda_table(rec: dict) -> str:
    """λ per layer group (rows) and fine-tuned model (columns), as a Markdown table."""
    models = [display_name(m["model"]) for m in rec.get("lambdas", [])]
    rows = [[g] + [m["lambda"].get(g) for m in rec.get("lambdas", [])] for g in rec.get("groups", [])]
    return _table(["group"] + models, rows)


def reproduce_command(rec: dict, out: str | None = None, *, display: bool = False) -> str:
    """The ``python -m acm merge`` command line that redoes this merge (``display``: short model names)."""
    o = rec.get("options", {})
    method = rec.get("method")
    name = display_name if display else (lambda spec: spec)
    parts = ["python", "-m", "acm", "merge", "--base", name(rec["base"]["model"])]
    for m in rec.get("models", []):
        parts += ["--ft", name(m["model"])]
    parts += ["--method", method]
    for key in _RELEVANT.get(method, ()):          # the options the method uses, from its registry spec
        opt, value = OPTIONS[key], o.get(key, OPTIONS[key].default)
        if opt.kind == "bool":
            parts += [opt.flag] if value else []
        elif opt.kind == "list":
            parts += [opt.flag, *[_fmt(w) for w in value]] if value else []
        elif opt.kind in ("int", "choice"):
            parts += [opt.flag, str(value)]
        else:
            parts += [opt.flag, _fmt(value)]
    if rec.get("acm") and rec.get("acm_analysis"):
        parts += _rule_flags(rec["acm_analysis"], name)
    if o.get("dtype"):
        parts += ["--dtype", str(o["dtype"])]
    if o.get("tokenizer_from") and o["tokenizer_from"] != "base":
        parts += ["--tokenizer-from", str(o["tokenizer_from"])]
    parts += ["--out", out or rec.get("name") or "merged"]
    return " ".join(shlex.quote(p) for p in parts)


def _calibration_arg(source: Any, name) -> str:
    """A recorded calibration source as a ``--calibration`` value (``bundled:<file>`` → ``bundled``)."""
    src = str(source or "bundled")
    return "bundled" if src.startswith("bundled:") else name(src)


def _rule_flags(entry: dict, name) -> list[str]:
    """The coefficient-rule flags of ``acm merge`` that redo a recipe's ``acm`` entry (softmax when the
    entry names no rule: recipes made before the paper's rule)."""
    if entry.get("rule") == "fim":
        fb = entry.get("fisher") or {}
        flags = ["--rule", "fim", "--t", _fmt(entry.get("t"))]
        if entry.get("score") not in (None, "fisher-delta"):
            flags += ["--fim-score", str(entry["score"])]
        flags += [f for flag, key in (("--fim-sequences", "sequences"), ("--fim-length", "length"),
                                      ("--fim-seed", "seed"), ("--fim-loss", "loss")) if fb.get(key) is not None
                  for f in (flag, str(fb[key]))]
    elif entry.get("rule") != "acm":
        flags = ["--acm", "analysis.json", "--rule", "softmax", "--t", _fmt(entry.get("t"))]
        if entry.get("metric") not in (None, "nmi"):
            flags += ["--metric", str(entry["metric"])]
    else:
        flags = ["--rule", "acm", "--t", _fmt(entry.get("t"))]
        if entry.get("against") == "merged":
            cal = (entry.get("analysis") or {}).get("calibration") or {}
            flags += ["--against", "merged", "--calibration", _calibration_arg(cal.get("source"), name)]
            if cal.get("requested_samples"):
                flags += ["--samples", str(cal["requested_samples"])]
            if cal.get("max_tokens") not in (None, 512):
                flags += ["--max-tokens", str(cal["max_tokens"])]
            if entry.get("estimator") not in (None, "labels"):
                flags += ["--rule-estimator", str(entry["estimator"])]
            if entry.get("max_values") != 1 << 18:
                flags += ["--rule-max-values", str(entry.get("max_values") or 0)]
        else:
            flags = ["--acm", "analysis.json", *flags]
        if entry.get("applies") == "merged-delta":
            flags += ["--applies", "merged-delta"]
    clip = entry.get("clip") or [None, None]
    flags += [f for flag, v in zip(("--clip-min", "--clip-max"), clip) if v is not None for f in (flag, _fmt(v))]
    return flags


def rule_section(rec: dict) -> list[str]:
    """The model card's lines for the paper's rule (``acm.rules.ACM``): its switches and per-point MI."""
    entry = rec.get("acm_analysis") if rec.get("acm") else None
    if entry and entry.get("rule") == "fim":
        return fim_section(entry)
    if not entry or entry.get("rule") != "acm":
        return []
    cal = (entry.get("analysis") or {}).get("calibration") or {}
    est = entry.get("estimator")
    est_text = ("discrete MI of the flattened bf16 values taken as labels (as scikit-learn's `mutual_info_score`)"
                if est == "labels" else "this project's joint histogram, per sample")
    applies = ("each task vector, weighted 1/N (Eq. 3)" if entry.get("applies") == "task-vectors"
               else "the delta of the plain merge above: base + λ·(merged − base)")
    lines = ["## Coefficient rule: acm (the paper's Eq. 2–3)", "",
             "λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)) from the MI between the base's activations and those of "
             f"{'each fine-tuned model' if entry.get('against') == 'fine-tuned' else 'a plain merge of them'} "
             f"per calibration sample j at activation point k; λ applies to {applies}.", "",
             _table(["parameter", "value"], [["t", entry.get("t")], ["MI against", entry.get("against")],
                                             ["λ applies to", entry.get("applies")], ["MI estimator", est_text],
                                             ["values per sample and point", entry.get("max_values")],
                                             ["calibration", _calibration_arg(cal.get("source"), display_name)],
                                             ["samples", entry.get("samples")]]), ""]
    lam, mi = entry.get("lambda") or {}, entry.get("mi_mean") or {}
    names = list(lam)
    if names and entry.get("groups"):
        rows = [[g, (entry.get("points") or [None] * len(entry["groups"]))[k]]
                + [x for n in names for x in (mi.get(n, [None] * (k + 1))[k], lam[n][k])]
                for k, g in enumerate(entry["groups"])]
        header = ["λ key", "activation point"] + [h for n in names for h in (f"mean MI {display_name(n)}",
                                                                              f"λ {display_name(n)}")]
        lines += [_table(header, rows), ""]
    return lines


def fim_section(entry: dict) -> list[str]:
    """The model card's lines for the fim rule (``acm.rules.fim``): the Fisher pass and per-layer F, ‖δ‖², α."""
    fb = entry.get("fisher") or {}
    only = entry.get("score") == "fisher-only"
    lines = ["## Coefficient rule: fim (data-free Fisher information)", "",
             "This project's reading of FIM-Merging (arXiv 2603.21705; its code is not public): αₖ = σ(−t·zₖ), "
             f"z the standardised log of {'Fₖ' if only else 'Fₖ·‖δₖ‖²'} over the layers, F the base's diagonal "
             "Fisher on random tokens (no calibration data); each task vector is weighted by its α.", "",
             _table(["parameter", "value"], [["t", entry.get("t")], ["score", entry.get("score")],
                                             ["random sequences", fb.get("sequences")], ["tokens each", fb.get("length")],
                                             ["seed", fb.get("seed")], ["loss", fb.get("loss")]]), ""]
    groups, lam, dsq = entry.get("groups") or [], entry.get("lambda") or {}, entry.get("delta_sq") or {}
    scores = entry.get("fisher_scores") or []
    if groups and len(scores) == len(groups):
        names = list(lam)
        rows = [[g, scores[k]] + [x for n in names for x in ((dsq.get(n) or [None] * (k + 1))[k], lam[n][k])]
                for k, g in enumerate(groups)]
        header = ["λ key", "Fisher F"] + [h for n in names for h in (f"‖δ‖² {display_name(n)}", f"α {display_name(n)}")]
        lines += [_table(header, rows), ""]
    return lines


def _public(value: Any) -> Any:
    """``value`` with every machine path (``/…``, ``bundled:/…``) shown by its last name: no paths in a card."""
    if isinstance(value, dict):
        return {_public(k): _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value.split(":", 1)[-1]):
        return display_name(value.split(":", 1)[-1])
    return value


def _provenance_lines(prov: Any, prefix: str = "") -> list[str]:
    lines: list[str] = []
    if isinstance(prov, dict):
        for k, v in prov.items():
            if isinstance(v, dict):
                lines += _provenance_lines(v, f"{prefix}{k}.")
            elif isinstance(v, list) and len(v) > 8:
                lines.append(f"- {prefix}{k}: {len(v)} entries")
            else:
                lines.append(f"- {prefix}{k}: {_fmt(v)}")
    return lines


def _acm_entry(rec: dict) -> dict | None:
    return rec.get("acm_analysis") if rec.get("acm") else None


def _card_intro(rec: dict) -> list[str]:
    """Front matter, title and the one-sentence summary."""
    base = display_name(rec["base"]["model"])
    models = [display_name(m["model"]) for m in rec.get("models", [])]
    method, acm = rec.get("method", ""), _acm_entry(rec)
    label = ("ACM-" if acm else "") + METHOD_NAMES.get(method, method)
    if acm:
        label += {"acm": " (acm rule)", "fim": " (fim rule)"}.get(acm.get("rule"), " (softmax rule)")
    front = {"base_model": [base] + models, "base_model_relation": "merge", "library_name": "transformers",
             "tags": ["merge", "acm"]}
    return ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
            f"# {rec.get('name') or 'merged model'}", "",
            f"A **{label}** merge of {', '.join(f'`{m}`' for m in models)} into the base `{base}`, made with "
            "ACM Merge Explorer (Activation-Guided Consensus Merging, arXiv 2505.14009"
            + ("; here the coefficients come from the data-free fim rule: the base's Fisher information on "
               "random tokens and each layer's task-vector size)." if acm and acm.get("rule") == "fim" else
               ": the coefficient of each layer group comes from the mutual information between the base's and "
               "the fine-tuned model's activations on calibration text)." if acm else "; plain method, one "
               "coefficient for the whole network)."), ""]


def _card_sources_and_method(rec: dict) -> list[str]:
    method, acm = rec.get("method", ""), _acm_entry(rec)
    rows = [["base", display_name(rec["base"]["model"]), rec["base"].get("revision"), rec["base"].get("commit")]]
    rows += [[f"fine-tuned {i + 1}", display_name(m["model"]), m.get("revision"), m.get("commit")]
             for i, m in enumerate(rec.get("models", []))]
    prow = [[k, rec.get("options", {}).get(k)] for k in _RELEVANT.get(method, ())]
    if acm and acm.get("rule") == "acm":
        prow += [["t (the paper's Eq. 2)", acm.get("t")]]
    elif acm and acm.get("rule") == "fim":
        prow += [["t (fim sigmoid sharpness)", acm.get("t")], ["fim score", acm.get("score")]]
    elif acm:
        prow += [["t (ACM sharpness)", acm.get("t")], ["α (ACM mean λ)", acm.get("alpha")]]
    if acm and acm.get("clip"):
        prow.append(["λ clip", acm.get("clip")])
    return ["## Sources", "", _table(["role", "model", "revision", "commit"], rows), "",
            "## Method", "", f"`{method}`{' with ACM coefficients' if acm else ''}: {rec.get('formula', '')}", "",
            "k is the layer group (`embed`, `block.0` … `block.{L-1}`, `head`); computed in float32, "
            f"written in {rec.get('output', {}).get('dtype', 'the base dtype')}.", "",
            "## Parameters", "", _table(["parameter", "value"], prow), ""]


def _lambda_caption(rec: dict) -> str:
    acm, method = _acm_entry(rec), rec.get("method", "")
    if acm and acm.get("rule") == "acm":
        if acm.get("applies") == "task-vectors":
            return "Task-vector weights λ/N from the paper's rule (see below; `head.norm` is the final norm's own λ)."
        return "λ of the paper's rule, applied to the plain merge's delta (see below)."
    if acm and acm.get("rule") == "fim":
        return "Task-vector weights α from the fim rule (see below; high Fisher score → smaller α)."
    if acm and acm.get("metric", "nmi") == "nmi":
        return "λ from the ACM analysis: λₖ = α·K·exp(−t·NMIₖ) / Σⱼ exp(−t·NMIⱼ) (mean α; lower NMI → larger λ)."
    if acm:
        return (f"λ from the ACM analysis: λₖ = α·K·exp(−t·sₖ) / Σⱼ exp(−t·sⱼ), sₖ = {acm.get('metric')} similarity "
                "(mean α; lower sₖ → larger λ).")
    return "Normalised weights of the linear average." if method == "linear" else "Plain method: λ = α for every group."


def _card_coefficients(rec: dict) -> list[str]:
    acm = _acm_entry(rec)
    out = ["## Coefficients λ per layer group", "", _lambda_caption(rec), "", lambda_table(rec), ""]
    if acm and acm.get("rule") != "acm" and isinstance(acm.get("nmi"), dict) and acm.get("groups"):
        names = list(acm["nmi"])
        rows = [[g] + [acm["nmi"][n][k] if k < len(acm["nmi"][n]) else None for n in names]
                for k, g in enumerate(acm["groups"])]
        out += ["NMI between base and fine-tuned activations per group (from the analysis):", "",
                _table(["group"] + [display_name(n) for n in names], rows), ""]
    out += rule_section(rec)
    if acm:
        out += ["## ACM analysis provenance", ""]
        if acm.get("source"):
            out += [f"Analysis file: `{display_name(str(acm['source']))}`", ""]
        out += _provenance_lines(_public(acm.get("analysis") or {})) or ["- (not recorded)"]
        out.append("")
    return out


def _card_output(rec: dict) -> list[str]:
    """Head, tokenizer, vocabulary notes and the output's size."""
    stats = rec.get("output", {})
    heads, tok = stats.get("heads") or {}, stats.get("tokenizer") or {}
    out: list[str] = []
    if heads or tok:
        out += ["## Output head and tokenizer", ""]
        if heads:
            mixed = heads.get("merged") == "untied" and "tied" in [heads.get("base"), *(heads.get("fine_tuned") or [])]
            out.append(f"- Output head: **{heads.get('merged')}** (base {heads.get('base')}; fine-tuned "
                       f"{', '.join(heads.get('fine_tuned') or []) or '—'})."
                       + (f" `{heads.get('head_tensor')}` = base head + Σ λ_head·(head − base head), where a tied "
                          "model's head is its input embedding; `tie_word_embeddings: false`." if mixed else ""))
        if tok:
            src = display_name(str(tok.get("model", "")))
            out.append(f"- Tokenizer, chat template ({tok.get('template')}) and generation defaults: from "
                       f"{tok.get('from')} (`{src}`), eos `{tok.get('eos_token')}`.")
        out.append("")
    if rec.get("vocab_notes"):
        out += ["## Vocabulary", ""] + [f"- {n}" for n in rec["vocab_notes"]] + [""]
    if stats:
        out += ["## Output", "",
                f"{stats.get('num_tensors')} tensors in {stats.get('num_shards')} safetensors shard(s), "
                f"{format_bytes(stats.get('bytes') or 0)}, dtype {stats.get('dtype')}, vocabulary "
                f"{stats.get('vocab_size')}. Full record: `acm_recipe.json`.", ""]
    return out


def model_card(rec: dict) -> str:
    """README.md of the merged model: Hub front matter, sources, method, parameters, λ table, usage."""
    name = rec.get("name") or "merged model"
    out = [*_card_intro(rec), *_card_sources_and_method(rec), *_card_coefficients(rec), *_card_output(rec)]
    out += ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'path = "{name}"  # this folder, or its Hub id once uploaded',
            "model = AutoModelForCausalLM.from_pretrained(path, dtype=\"auto\")",
            "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
            "## Reproduce", "", "```bash", reproduce_command(rec, display=True), "```", "",
            f"Made with ACM Merge Explorer {rec.get('version', '')} on {rec.get('created', '')}.", ""]
    return "\n".join(out)
