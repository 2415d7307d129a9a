"""ACM coefficients as a mergekit config: per-layer weights, each method's sparsification, or a comment-only
file that says why mergekit cannot reproduce a merge.

Why here (merging, not rules): the export needs the method registry (how each method's sparsification
maps onto mergekit's) as well as the λ of a rule (``acm.rules.coefficients.compute``).
"""

from __future__ import annotations

import math
from typing import Any

from acm.errors import InputError
from acm.merging.methods import OPTIONS, SPECS, check_drop_rate, check_gamma
from acm.rules import DEFAULT_RULE
from acm.rules.coefficients import _check_alpha, compute

MERGEKIT_METHODS = {**{k: s.mergekit for k, s in SPECS.items() if s.mergekit}, "dare_linear": "dare_linear"}
_EMBED_FALLBACK = ("embed_tokens", "wte", "wpe", "word_embeddings")
_HEAD_FALLBACK = ("lm_head", "model.norm.", "ln_f", "final_layernorm")


def _filters(analysis, group: str, *, split_norm: bool = False) -> list[str]:
    """mergekit filters (tensor-name substrings) of a λ key; ``split_norm``: the head group's output head
    and its other tensors (the final norm, key ``head.norm``) carry separate values."""
    prov = analysis.provenance or {}
    if split_norm and group in ("head", "head.norm"):
        tensors = (prov.get("group_tensors") or {}).get("head") or []
        head = (prov.get("heads") or {}).get("head_tensor") or "lm_head.weight"
        picked = [n for n in tensors if (n == head) == (group == "head")]
        if not tensors:
            picked = ["lm_head.weight"] if group == "head" else ["model.norm.weight"]
        names = [n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n for n in picked]
        return list(dict.fromkeys(names))
    tensors = (prov.get("group_tensors") or {}).get(group)
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
    """What mergekit does differently when tied and untied heads are mixed (``acm.checkpoints.heads``)."""
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
                     metric: str = "nmi", rule: str | None = DEFAULT_RULE, score: str = "fisher-delta") -> str:
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
    coef = compute(analysis, rule, t, alpha, clip, metric=metric, score=score)
    prov = analysis.provenance or {}
    if base_model is None:
        base_model = ((prov.get("models") or {}).get("base") or {}).get("model") or "BASE_MODEL"
    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method], "base_model": base_model,
                              "models": _model_entries(analysis, coef, sparse_params), "parameters": global_params}
    if dtype:
        config["dtype"] = dtype
    header = [*_header(coef, alpha, metric, global_params, method_notes), *_head_warning(prov.get("heads") or {})]
    if tokenizer_source:
        header += [f"# Tokenizer: this merge carries the tokenizer, chat template and generation defaults of "
                   f"{tokenizer_source}.",
                   "#   Copy those files into mergekit's output; do not use mergekit's tokenizer_source, which",
                   "#   re-maps embedding rows by token text (R1-distilled models reuse ids for other tokens)."]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(header) + "\n" + body


def _model_entries(analysis, coef, sparse_params: dict[str, Any]) -> list[dict[str, Any]]:
    """One mergekit model entry per fine-tuned model: filters for embed / final norm / head, a gradient
    with one value per block."""
    blocks = [g for g in coef.keys if g.startswith("block.")]
    entries = []
    for name, lam in zip(coef.models, coef.weights()):
        weight: list[dict[str, Any]] = []
        for group in ("embed", "head.norm", "head"):
            if group in lam:
                for flt in _filters(analysis, group, split_norm="head.norm" in lam):
                    weight.append({"filter": flt, "value": _r(lam[group])})
        weight.append({"value": [_r(lam[b]) for b in blocks]})
        entries.append({"model": name, "parameters": {"weight": weight, **sparse_params}})
    return entries


def _header(coef, alpha: float, metric: str, global_params: dict[str, Any], method_notes: list[str]) -> list[str]:
    """The comment block: the rule's formula and parameters, how the weights map, per-model λ."""
    clip, t, n_blocks = coef.params["clip"], coef.params["t"], sum(g.startswith("block.") for g in coef.keys)
    clipped = f", clipped to [{clip[0]}, {clip[1]}]" if clip else ""
    if coef.rule == "acm":
        formula = [f"# The paper's rule (arXiv 2505.14009, Eq. 2-3): lambda_k = 1 - mean_j sigmoid(t*(MI_kj - max_j MI_kj)) "
                   f"with t={_r(float(t))}{clipped},",
                   f"#   from per-sample MI on {coef.values.shape[-1]} calibration samples; weight = lambda/N "
                   f"(N={len(coef.models)}, Eq. 3: theta_0 + (1/N) sum_i lambda_i tau_i)."]
    elif coef.rule == "fim":
        fb = coef.analysis.fisher
        what = "F_k" if coef.params["score"] == "fisher-only" else "F_k*|delta_ik|^2"
        formula = [f"# FIM rule (this project's reading of arXiv 2603.21705): alpha_ik = sigmoid(-t*z_ik), z = standardised "
                   f"log({what}) over the layers, t={_r(float(t))}{clipped};",
                   f"#   F = the base's diagonal Fisher on {fb.get('sequences')} random sequences x {fb.get('length')} "
                   f"tokens (seed {fb.get('seed')}, loss {fb.get('loss')}); weight = alpha (theta_0 + sum_i alpha_i tau_i)."]
    else:
        s = "NMI" if metric == "nmi" else "s"
        formula = [f"# lambda_k = alpha*K*exp(-t*{s}_k)/sum_j exp(-t*{s}_j) with t={_r(float(t))}, "
                   f"alpha={_r(_check_alpha(alpha))}{clipped}, K={len(coef.keys)} groups"
                   + ("." if metric == "nmi" else f"; s = {metric} similarity.")]
    header = [
        "# ACM (Activation-Guided Consensus Merging) coefficients as a mergekit config.",
        *formula,
        f"# weight: one value per decoder block ({n_blocks} blocks; mergekit's layer gradient hits each block",
        "#   exactly when the list has one value per layer); the embed group (input embeddings, tied",
        "#   output embeddings) and the head group (final norm, lm_head; the acm and fim rules give the final norm its",
        "#   own value) are carried by the 'filter' entries (substring match on tensor names, first match wins).",
        "# normalize: false = no division by the sum of weights (this project's default)."
        if not global_params.get("normalize") else
        "# normalize: true = divide by the sum of the agreeing models' weights (as this merge's --normalize).",
        *method_notes,
    ]
    for name, lam in zip(coef.models, coef.weights()):
        norm = f", final norm {_r(lam['head.norm'])}" if "head.norm" in lam else ""
        header.append(f"# {name}: embed {_r(lam.get('embed', float('nan')))}{norm}, "
                      f"head {_r(lam.get('head', float('nan')))}")
    return header


__all__ = ["MERGEKIT_METHODS", "to_mergekit_yaml"]
