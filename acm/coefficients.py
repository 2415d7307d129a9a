"""From per-group NMI to per-group merge coefficients λ (the hyperparameter t).

This project's precise form of the paper's rule (README "The formulas"): with K groups, base
coefficient α > 0 and sharpness t ≥ 0,

    λₖ(t) = α · K · exp(−t·NMIₖ) / Σⱼ exp(−t·NMIⱼ)

so mean λ = α, t = 0 gives λₖ = α everywhere (ACM reduces exactly to the plain method), larger t
gives more contrast, and a group whose fine-tuned activations share less information with the
base (lower NMI) never gets a smaller λ. Optional clipping to [λ_min, λ_max] is applied *after*
(and then the mean is no longer exactly α). No model work: microseconds, vectorised over a grid
of t so a UI slider can redraw instantly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from acm.errors import InputError

# Our merge-method names → mergekit's.
MERGEKIT_METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ta": "dare_linear",
                    "dare_linear": "dare_linear", "dare_ties": "dare_ties"}
_EMBED_FALLBACK = ("embed_tokens", "wte", "wpe", "word_embeddings")
_HEAD_FALLBACK = ("lm_head", "model.norm.", "ln_f", "final_layernorm")


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number > 0, got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0):
        raise InputError(f"alpha must be a finite number > 0, got {alpha!r}")
    return a


def _check_clip(clip) -> tuple[float | None, float | None] | None:
    if clip is None:
        return None
    try:
        lo, hi = clip
    except (TypeError, ValueError):
        raise InputError(f"clip must be a (min, max) pair, got {clip!r}") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    for name, v in (("clip min", lo), ("clip max", hi)):
        if v is not None and not math.isfinite(v):
            raise InputError(f"{name} must be finite, got {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise InputError(f"clip min {lo} is larger than clip max {hi}")
    if lo is None and hi is None:
        return None
    return lo, hi


def _check_t(t) -> np.ndarray:
    try:
        arr = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"t must be a number >= 0 (or a list of them), got {t!r}") from None
    if arr.ndim > 1:
        raise InputError("t must be a number or a 1-D grid of numbers")
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InputError(f"t must be finite and >= 0, got {t!r}")
    return arr


def lambdas(nmi, t, alpha: float = 1.0, clip=None) -> np.ndarray:
    """λ per group for NMI of shape [..., K]; ``t`` a scalar → [..., K], a 1-D grid → [len(t), ..., K].

    Numerically stable softmax form (the maximum exponent is subtracted before ``exp``).
    """
    a = _check_alpha(alpha)
    clip = _check_clip(clip)
    tt = _check_t(t)
    x = np.asarray(nmi, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise InputError("nmi must hold at least one group")
    if not np.all(np.isfinite(x)):
        raise InputError("nmi values must be finite")
    k = x.shape[-1]
    grid = tt.reshape(tt.shape + (1,) * x.ndim)          # [T, 1.., 1] or scalar-shaped
    z = -grid * x                                         # broadcast → [T, ..., K] / [..., K]
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    lam = a * k * e / e.sum(axis=-1, keepdims=True)
    if clip is not None:
        lam = np.clip(lam, -np.inf if clip[0] is None else clip[0], np.inf if clip[1] is None else clip[1])
    return lam


def _nmi_rows(analysis, metric: str = "nmi") -> tuple[list[str], list[str], np.ndarray]:
    """(groups, models, [n_models, K] similarity of ``metric``) — the sₖ that drive λ."""
    groups = list(analysis.groups)
    models = [m.model for m in analysis.models]
    if metric == "nmi":
        return groups, models, analysis.nmi_matrix()
    return groups, models, analysis.similarity_matrix(metric)


def coefficient_table(analysis, t: float, alpha: float = 1.0, clip=None, *, metric: str = "nmi") -> dict:
    """Everything a user needs to see for one t: the driving similarity sₖ and λ per (model, group).

    ``metric`` (``acm.similarity.METRICS``) picks which similarity drives λ (the formula is the same
    with sₖ in place of NMIₖ). ``{"t", "alpha", "clip", "metric", "groups", "models": [{"model",
    "mean_lambda", "groups": [{"name", "similarity", "<metric>", "lambda", "lambda_unclipped"?,
    "clipped"?}]}]}`` (the value is under both "similarity" and the metric's key, e.g. "nmi").
    """
    t_val = float(_check_t(t).reshape(-1)[0]) if np.ndim(t) == 0 else None
    if t_val is None:
        raise InputError("coefficient_table takes one t (use lambdas() for a grid)")
    a = _check_alpha(alpha)
    clip = _check_clip(clip)
    groups, models, nmi = _nmi_rows(analysis, metric)
    raw = lambdas(nmi, t_val, a)
    lam = lambdas(nmi, t_val, a, clip=clip)
    out_models = []
    for i, name in enumerate(models):
        rows = []
        for k, g in enumerate(groups):
            row: dict[str, Any] = {"name": g, metric: float(nmi[i, k]), "similarity": float(nmi[i, k]),
                                   "lambda": float(lam[i, k])}
            if clip is not None:
                row["lambda_unclipped"] = float(raw[i, k])
                row["clipped"] = bool(lam[i, k] != raw[i, k])
            rows.append(row)
        out_models.append({"model": name, "mean_lambda": float(lam[i].mean()), "groups": rows})
    s = "NMI" if metric == "nmi" else f"s[{metric}]"
    return {"t": t_val, "alpha": a, "clip": list(clip) if clip is not None else None, "groups": groups,
            "metric": metric,
            "formula": f"lambda_k = alpha * K * exp(-t*{s}_k) / sum_j exp(-t*{s}_j), clipped after",
            "models": out_models}


def lambdas_by_group(analysis, t: float, alpha: float = 1.0, clip=None, *,
                     metric: str = "nmi") -> list[dict[str, float]]:
    """One ``{group: λ}`` per fine-tuned model — the form ``merge_models(lambdas=...)`` takes.

    ``metric``: which similarity of the analysis drives λ (default NMI)."""
    groups, _, nmi = _nmi_rows(analysis, metric)
    lam = lambdas(nmi, float(_check_t(t).reshape(-1)[0]), alpha, clip=clip)
    return [{g: float(v) for g, v in zip(groups, row)} for row in lam]


def _filters(analysis, group: str) -> list[str]:
    tensors = ((analysis.provenance or {}).get("group_tensors") or {}).get(group)
    if tensors:
        names = [n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n for n in tensors]
        return list(dict.fromkeys(names))
    return list(_EMBED_FALLBACK if group == "embed" else _HEAD_FALLBACK)


def _not_expressible(reason: str) -> str:
    """A mergekit 'config' that says plainly why there is none, instead of one that merges something else."""
    import textwrap

    lines = ["# ACM (Activation-Guided Consensus Merging): NO mergekit config for this merge.",
             *("# " + line for line in textwrap.wrap(reason, 100))]
    return "\n".join(lines) + "\n"


def _head_warning(heads: dict) -> list[str]:
    """What mergekit does differently when tied and untied heads are mixed (``acm.heads``)."""
    kinds = [heads.get("base"), *(heads.get("fine_tuned") or [])]
    if heads.get("merged") != "untied" or "tied" not in kinds:
        return []
    head = heads.get("head_tensor") or "lm_head.weight"
    lines = [
        f"# WARNING - tied and untied output heads are mixed (base {heads.get('base')}, fine-tuned "
        f"{', '.join(heads.get('fine_tuned') or [])}).",
        f"#   ACM Merge Explorer writes an untied model: {head} = base head + lambda_head*(head - base head),",
        "#   a tied model's head being its input embedding, and sets tie_word_embeddings: false.",
        f"#   mergekit computes the same {head} (it reads a tied model's head from its embedding) and copies",
    ]
    if heads.get("base") == "tied":
        lines += ["#   the base's config.json, which says tie_word_embeddings: true: transformers then ties the head",
                  f"#   back to the embedding and ignores the merged {head}. After mergekit, set",
                  "#   \"tie_word_embeddings\": false in the output config.json to get this merge."]
    else:
        lines += ["#   the base's (untied) config.json, so this mix loads as intended."]
    return lines


def _r(v: float) -> float:
    return float(f"{v:.6g}")


def to_mergekit_yaml(analysis, t: float, alpha: float = 1.0, *, method: str = "task_arithmetic",
                     base_model: str | None = None, density: float | None = None, clip=None,
                     dtype: str | None = None, tokenizer_source: str | None = None,
                     drop_rate: float | None = None, metric: str = "nmi") -> str:
    """A mergekit-style config reproducing the ACM λ of every layer group.

    What mergekit can express, and how we use it: ``weight`` per model may be a list of
    conditional values ``{filter, value}`` (first substring match on the tensor name wins) and a
    plain list of numbers is a gradient over the layers — with exactly one value per block,
    block k gets exactly λ_block.k (mergekit evaluates it at t = k/(L−1)). The embed and head
    groups are carried by ``filter`` entries naming their tensors (from the analysis; family
    defaults otherwise). ``normalize: false`` keeps mergekit from dividing by the sum of the
    weights, as in this project's task arithmetic / TIES. For DARE, ``density`` = 1 − drop rate
    (mergekit rescales kept entries by 1/density, as we do).
    """
    import yaml

    if method not in MERGEKIT_METHODS:
        raise InputError(f"mergekit export supports {', '.join(sorted(MERGEKIT_METHODS))}; got {method!r} "
                         "(ACM coefficients scale task vectors, so 'linear' has nothing to carry them)")
    if density is not None and not (0.0 < float(density) <= 1.0):
        raise InputError(f"density must be in (0, 1], got {density!r}")
    if drop_rate is not None and method in ("dare_ta", "dare_linear", "dare_ties"):
        # A merge's DARE drop rate p: mergekit's `density` is the random keep fraction 1 − p. Our dare_ties
        # also trims by magnitude (TIES density); mergekit's dare_ties has no magnitude trim.
        if not (0.0 <= float(drop_rate) < 1.0):
            raise InputError(f"drop rate must be in [0, 1), got {drop_rate!r}")
        if method == "dare_ties" and density is not None and float(density) < 1.0:
            return _not_expressible(
                f"this dare_ties merge drops entries at random (p = {_r(float(drop_rate))}) AND trims each task "
                f"vector to its top {_r(float(density))} by magnitude; mergekit's dare_ties does the random drop "
                "only (its `density` is the keep fraction), so no mergekit config reproduces it. Use "
                "`python -m acm merge` (the recipe's reproduce command), or merge with TIES density 1 to export.")
        density = 1.0 - float(drop_rate)
    groups, models, _ = _nmi_rows(analysis, metric)
    per_model = lambdas_by_group(analysis, t, alpha, clip=clip, metric=metric)
    blocks = [g for g in groups if g.startswith("block.")]
    prov = analysis.provenance or {}
    if base_model is None:
        base_model = ((prov.get("models") or {}).get("base") or {}).get("model") or "BASE_MODEL"
    sparse = method in ("ties", "dare_ties", "dare_ta", "dare_linear")
    entries = []
    for name, lam in zip(models, per_model):
        weight: list[dict[str, Any]] = []
        for group in ("embed", "head"):
            if group in lam:
                for flt in _filters(analysis, group):
                    weight.append({"filter": flt, "value": _r(lam[group])})
        weight.append({"value": [_r(lam[b]) for b in blocks]})
        params: dict[str, Any] = {"weight": weight}
        if sparse:
            params["density"] = float(density if density is not None else (0.2 if "ties" in method else 0.7))
        entries.append({"model": name, "parameters": params})
    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method], "base_model": base_model,
                              "models": entries, "parameters": {"normalize": False}}
    if dtype:
        config["dtype"] = dtype
    clip = _check_clip(clip)
    header = [
        "# ACM (Activation-Guided Consensus Merging) coefficients as a mergekit config.",
        f"# lambda_k = alpha*K*exp(-t*{'NMI' if metric == 'nmi' else 's'}_k)/sum_j exp(-t*"
        f"{'NMI' if metric == 'nmi' else 's'}_j) with t={_r(float(t))}, alpha={_r(_check_alpha(alpha))}"
        + (f", clipped to [{clip[0]}, {clip[1]}]" if clip else "") + f", K={len(groups)} groups"
        + ("." if metric == "nmi" else f"; s = {metric} similarity."),
        f"# weight: one value per decoder block ({len(blocks)} blocks; mergekit's layer gradient hits each block",
        "#   exactly when the list has one value per layer); the embed group (input embeddings, tied",
        "#   output embeddings) and the head group (final norm, lm_head) are carried by the 'filter'",
        "#   entries (substring match on tensor names, first match wins).",
        "# normalize: false = no division by the sum of weights (this project's default).",
    ]
    for name, lam in zip(models, per_model):
        header.append(f"# {name}: embed {_r(lam.get('embed', float('nan')))}, head {_r(lam.get('head', float('nan')))}")
    header += _head_warning(prov.get("heads") or {})
    if tokenizer_source:
        header += [f"# Tokenizer: this merge carries the tokenizer, chat template and generation defaults of "
                   f"{tokenizer_source}.",
                   "#   Copy those files into mergekit's output; do not use mergekit's tokenizer_source, which",
                   "#   re-maps embedding rows by token text (R1-distilled models reuse ids for other tokens)."]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(header) + "\n" + body


__all__ = ["lambdas", "coefficient_table", "lambdas_by_group", "to_mergekit_yaml", "MERGEKIT_METHODS"]
