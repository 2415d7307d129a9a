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
from acm.methods import OPTIONS, SPECS, check_drop_rate, check_gamma

# Our merge-method names → mergekit's (from the registry, acm.methods; "dare_linear" is accepted as a name too).
MERGEKIT_METHODS = {**{k: s.mergekit for k, s in SPECS.items() if s.mergekit}, "dare_linear": "dare_linear"}
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


def _mergekit_sparsity(method: str, density: float | None, drop_rate: float | None, gamma: float | None,
                       normalize: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]] | str:
    """Per-model and global mergekit parameters that reproduce ``method``'s sparsification, plus header
    lines; or the reason (a str) why no mergekit config reproduces it.

    How each maps (mergekit ≥ 0.1, mergekit/sparsify.py and merge_methods/generalized_task_arithmetic.py):

    * TIES: ``magnitude`` with ``density`` (k = int(density·n) there, round(density·n) here: at most one
      entry per tensor apart), sign election by sum; ``normalize`` as here.
    * DARE: ``random`` (Bernoulli keep with probability ``density`` = 1 − p). mergekit's ``rescale: true``
      multiplies by the tensor's L1-norm ratio, not by 1/(1 − p) as DARE (and this project) does, so we
      write ``rescale: false`` and carry 1/(1 − p) as the global ``lambda`` (applied to the merged delta
      after the optional normalisation: the same result, since 1/(1 − p) is common to all entries). The
      random streams differ: the merges agree in distribution, not bit for bit.
    * Breadcrumbs: ``magnitude_outliers`` with ``density`` and ``gamma``, ``rescale: false``; mergekit's
      counts are int(·) instead of round(·) and its tie order is an unstable sort. mergekit ≤ 0.1.4 keeps
      nothing of a tensor where int(gamma·n) = 0 (its ``indices[n_bot:-0]`` is empty); 0.1.5 fixed that
      (``indices[n_bot:n_bot + target_n]``), so the config says which version it needs.
    * DELLA: ``della_magprune`` has our keep-probability schedule, but its ``rescale`` is the L1-norm ratio
      (or none), never 1/pⱼ per entry: not reproducible.
    """
    spec = SPECS[method] if method in SPECS else SPECS["dare_ta"]       # "dare_linear"
    per_model: dict[str, Any] = {}
    glob: dict[str, Any] = {"normalize": bool(normalize) if spec.consensus else False}
    notes: list[str] = []
    if spec.drop == "della":
        return (f"this {spec.label} merge keeps each entry with probability p_j (density ± epsilon by magnitude rank "
                "in its row) and rescales the kept ones by 1/p_j; mergekit's della / della_linear use the same "
                "keep probabilities but rescale by the whole tensor's L1-norm ratio (rescale: true) or not at all, "
                "so no mergekit config reproduces it. Use `python -m acm merge` (the recipe's reproduce command).")
    if spec.drop == "dare":
        if drop_rate is not None:
            # A merge's DARE drop rate p: mergekit's `density` is the random keep fraction 1 − p. Our dare_ties
            # also trims by magnitude (TIES density); mergekit's dare_ties has no magnitude trim.
            p = check_drop_rate(drop_rate)
            if spec.trim and density is not None and float(density) < 1.0:
                return (f"this dare_ties merge drops entries at random (p = {_r(p)}) AND trims each task vector to "
                        f"its top {_r(float(density))} by magnitude; mergekit's dare_ties does the random drop only "
                        "(its `density` is the keep fraction), so no mergekit config reproduces it. Use "
                        "`python -m acm merge` (the recipe's reproduce command), or merge with TIES density 1 to "
                        "export.")
            keep = 1.0 - p
        else:
            keep = float(density if density is not None else 1.0 - OPTIONS["drop_rate"].default)
        per_model["density"] = keep
        glob["rescale"] = False
        if keep < 1.0:
            glob["lambda"] = _r(1.0 / keep)
        notes += [f"# DARE: density = keep fraction 1 - p = {_r(keep)}; rescale: false and lambda: 1/(1 - p) multiply",
                  "#   the merged delta by 1/(1 - p), as this merge does (mergekit's own rescale: true would match the",
                  "#   tensor's L1 norm instead). Random masks differ from ours: the same merge in distribution only."]
    elif spec.trim == "magnitude":
        per_model["density"] = float(density if density is not None else OPTIONS["density"].default)
    elif spec.trim == "outliers":
        g = check_gamma(gamma if gamma is not None else OPTIONS["gamma"].default)
        small = f"fewer than {math.ceil(1 / g)} entries" if g > 0 else "any size (gamma = 0)"
        per_model["density"] = float(density if density is not None else OPTIONS["density"].default)
        per_model["gamma"] = g
        glob["rescale"] = False
        notes += [f"# Breadcrumbs: density {_r(per_model['density'])} kept below the top gamma {_r(g)} outliers. mergekit",
                  "#   counts int(density*n) and int(gamma*n) (round() here: at most one entry per tensor apart) and",
                  "#   breaks ties in any order. NEEDS mergekit >= 0.1.5: 0.1.4 and earlier keep NOTHING of a tensor",
                  f"#   of {small} (int(gamma*n) = 0 there), where this merge keeps the density share."]
    return per_model, glob, notes


def to_mergekit_yaml(analysis, t: float, alpha: float = 1.0, *, method: str = "task_arithmetic",
                     base_model: str | None = None, density: float | None = None, clip=None,
                     dtype: str | None = None, tokenizer_source: str | None = None,
                     drop_rate: float | None = None, gamma: float | None = None, normalize: bool = False,
                     metric: str = "nmi") -> str:
    """A mergekit-style config reproducing the ACM λ of every layer group.

    What mergekit can express, and how we use it: ``weight`` per model may be a list of
    conditional values ``{filter, value}`` (first substring match on the tensor name wins) and a
    plain list of numbers is a gradient over the layers — with exactly one value per block,
    block k gets exactly λ_block.k (mergekit evaluates it at t = k/(L−1)). The embed and head
    groups are carried by ``filter`` entries naming their tensors (from the analysis; family
    defaults otherwise). ``normalize: false`` keeps mergekit from dividing by the sum of the
    weights, as in this project's task arithmetic / TIES (``normalize`` = the merge's own flag for
    the sign-election methods). The sparsification of each method maps as ``_mergekit_sparsity``
    says — or the output is a comment-only file saying why mergekit cannot reproduce the merge.
    """
    import yaml

    if method not in MERGEKIT_METHODS:
        raise InputError(f"mergekit export supports {', '.join(sorted(MERGEKIT_METHODS))}; got {method!r} "
                         "(ACM coefficients scale task vectors, so 'linear' has nothing to carry them)")
    if density is not None and not (0.0 < float(density) <= 1.0):
        raise InputError(f"density must be in (0, 1], got {density!r}")
    mapped = _mergekit_sparsity(method, density, drop_rate, gamma, normalize)
    if isinstance(mapped, str):
        return _not_expressible(mapped)
    sparse_params, global_params, method_notes = mapped
    groups, models, _ = _nmi_rows(analysis, metric)
    per_model = lambdas_by_group(analysis, t, alpha, clip=clip, metric=metric)
    blocks = [g for g in groups if g.startswith("block.")]
    prov = analysis.provenance or {}
    if base_model is None:
        base_model = ((prov.get("models") or {}).get("base") or {}).get("model") or "BASE_MODEL"
    entries = []
    for name, lam in zip(models, per_model):
        weight: list[dict[str, Any]] = []
        for group in ("embed", "head"):
            if group in lam:
                for flt in _filters(analysis, group):
                    weight.append({"filter": flt, "value": _r(lam[group])})
        weight.append({"value": [_r(lam[b]) for b in blocks]})
        params: dict[str, Any] = {"weight": weight, **sparse_params}
        entries.append({"model": name, "parameters": params})
    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method], "base_model": base_model,
                              "models": entries, "parameters": global_params}
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
        "# normalize: false = no division by the sum of weights (this project's default)."
        if not global_params.get("normalize") else
        "# normalize: true = divide by the sum of the agreeing models' weights (as this merge's --normalize).",
        *method_notes,
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
