"""From an analysis to per-layer merge coefficients λ (the hyperparameter t), for every rule.

``compute`` is the one call the app, the CLI and the tuner use: (analysis, rule, t, α, clip, metric)
→ ``Coefficients`` (λ per fine-tuned model and λ key, the task-vector weights the merge applies, and
the recipe's ``acm`` entry).

The paper's rule (``acm``, the default; ``acm.rules.acm_lambdas``): per activation point k,
λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)) from per-sample MI, and the merge applies λ/N to each of
the N task vectors (Eq. 3). λ keys: ``embed``, ``block.k``, ``head.norm`` (the final norm) and
``head`` (the output head).

This project's alternative (``softmax``): with K groups, base coefficient α > 0 and sharpness t ≥ 0,

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
from acm.rules import ACM, DEFAULT_RULE, acm_lambdas, check_t, get_rule

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


def coefficient_table(analysis, t: float | None = None, alpha: float = 1.0, clip=None, *, metric: str = "nmi",
                      rule: str | None = DEFAULT_RULE, against: str = "fine-tuned",
                      applies: str = "task-vectors") -> dict:
    """Everything a user needs to see for one t: what drives λ, and λ per (model, λ key).

    softmax: ``{"rule", "t", "alpha", "clip", "metric", "groups", "formula", "models": [{"model",
    "mean_lambda", "groups": [{"name", "similarity", "<metric>", "lambda", "lambda_unclipped"?,
    "clipped"?}]}]}`` (the similarity is under both "similarity" and the metric's key, e.g. "nmi").
    acm: the same shape with, per row, the activation point, its per-sample MI (mean, std, max, nats)
    and the task-vector ``weight`` the merge applies (λ/N); plus "against", "applies", "scale".
    """
    if np.ndim(t) != 0:
        raise InputError("coefficient_table takes one t (use lambdas() / acm_curve() for a grid)")
    c = compute(analysis, rule, t, alpha, clip, metric=metric, against=against, applies=applies)
    out_models = []
    for i, name in enumerate(c.models):
        rows = []
        for k, key in enumerate(c.keys):
            row: dict[str, Any] = {"name": key}
            if c.rule == "acm":
                mi = c.values[i, k]
                row.update({"point": c.analysis.sample_info["points"][k], "mi_mean": float(mi.mean()),
                            "mi_std": float(mi.std()), "mi_max": float(mi.max()), "lambda": float(c.lambdas[i, k]),
                            "weight": float(c.lambdas[i, k] * c.scale)})
            else:
                row.update({metric: float(c.values[i, k]), "similarity": float(c.values[i, k]),
                            "lambda": float(c.lambdas[i, k])})
            if c.params["clip"] is not None:
                row["lambda_unclipped"] = float(c.unclipped[i, k])
                row["clipped"] = bool(c.lambdas[i, k] != c.unclipped[i, k])
            rows.append(row)
        out_models.append({"model": name, "mean_lambda": float(c.lambdas[i].mean()), "groups": rows})
    clip_out = list(c.params["clip"]) if c.params["clip"] is not None else None
    if c.rule == "acm":
        return {"rule": "acm", "t": c.params["t"], "clip": clip_out, "groups": list(c.keys),
                "against": c.params["against"], "applies": c.params["applies"], "scale": c.scale,
                "samples": int(c.values.shape[-1]), "estimator": c.analysis.sample_info.get("estimator"),
                "formula": "lambda_k = 1 - mean_j sigmoid(t*(MI_kj - max_j MI_kj)); "
                           "theta = theta_0 + (1/N) sum_i lambda_ik tau_ik, clipped after",
                "models": out_models}
    s = "NMI" if metric == "nmi" else f"s[{metric}]"
    return {"rule": "softmax", "t": c.params["t"], "alpha": c.params["alpha"], "clip": clip_out,
            "groups": list(c.keys), "metric": metric,
            "formula": f"lambda_k = alpha * K * exp(-t*{s}_k) / sum_j exp(-t*{s}_j), clipped after",
            "models": out_models}


def lambdas_by_group(analysis, t: float | None = None, alpha: float = 1.0, clip=None, *, metric: str = "nmi",
                     rule: str | None = DEFAULT_RULE) -> list[dict[str, float]]:
    """One ``{key: weight}`` per fine-tuned model — the form ``merge_models(lambdas=...)`` takes
    (the acm rule's λ/N; softmax's λ)."""
    return compute(analysis, rule, t, alpha, clip, metric=metric).weights()


class Coefficients:
    """λ of one rule for one analysis: per fine-tuned model and λ key, plus what the merge applies.

    ``lambdas`` [models, keys] are the rule's λ (clipped when asked); ``weights()`` are the task-vector
    weights a merge uses: λ/N under the acm rule's Eq. 3, λ itself under softmax.
    """

    def __init__(self, rule: str, params: dict, keys: list[str], models: list[str], lambdas: np.ndarray,
                 unclipped: np.ndarray, values: np.ndarray, analysis: Any):
        self.rule, self.params, self.keys, self.models = rule, params, keys, models
        self.lambdas, self.unclipped, self.values, self.analysis = lambdas, unclipped, values, analysis

    @property
    def scale(self) -> float:
        """What λ is multiplied by in the merge: 1/N (Eq. 3) for the acm rule, 1 for softmax."""
        return 1.0 / len(self.models) if self.rule == "acm" else 1.0

    def by_model(self) -> list[dict[str, float]]:
        """One ``{key: λ}`` per fine-tuned model (the rule's λ)."""
        return [{k: float(v) for k, v in zip(self.keys, row)} for row in self.lambdas]

    def weights(self) -> list[dict[str, float]]:
        """One ``{key: weight}`` per fine-tuned model — what ``merge_models(lambdas=…)`` takes."""
        return [{k: float(v) * self.scale for k, v in zip(self.keys, row)} for row in self.lambdas]

    def mean_over_models(self) -> dict[str, float]:
        """One λ per key (the mean over fine-tuned models): what a merged delta is rescaled by."""
        return {k: float(v) for k, v in zip(self.keys, self.lambdas.mean(axis=0))}

    def entry(self, source: str | None = None) -> dict:
        """The recipe's ``acm`` entry (``merge_models(acm=…)``): rule, parameters, λ and their inputs."""
        a, p = self.analysis, self.params
        out: dict[str, Any] = {"analysis": a.provenance, "t": p["t"], "alpha": p["alpha"],
                               "clip": list(p["clip"]) if p["clip"] else None}
        if source is not None:
            out["source"] = str(source)
        if self.rule == "softmax":     # the recipe softmax merges always had (cache keys stay the same)
            metric = p["metric"]
            if all(m.nmi for m in a.models):
                out["nmi"] = {str(m.model): [float(x) for x in m.nmi] for m in a.models}
            out["groups"] = list(a.groups)
            if metric != "nmi":
                out["metric"] = metric
                out["similarity"] = {str(m.model): [float(x) for x in m.values(metric)] for m in a.models}
            return out
        info = a.sample_info
        mi = a.sample_mi_matrix()
        out.update({"rule": "acm", "against": p["against"], "applies": p["applies"], "scale": self.scale,
                    "estimator": info.get("estimator"), "max_values": info.get("max_values"),
                    "groups": list(self.keys), "points": list(info.get("points") or []),
                    "samples": int(mi.shape[-1]),
                    "lambda": {str(m): [round(float(x), 6) for x in row] for m, row in zip(self.models, self.lambdas)},
                    "mi_mean": {str(m): [round(float(x), 6) for x in row]
                                for m, row in zip(self.models, mi.mean(axis=-1))}})
        return out


def compute(analysis, rule: str | None = DEFAULT_RULE, t: float | None = None, alpha: float = 1.0, clip=None, *,
            metric: str = "nmi", against: str = "fine-tuned", applies: str = "task-vectors") -> Coefficients:
    """λ of ``rule`` at ``t`` for every fine-tuned model of ``analysis`` — the one path app, CLI and tuner use.

    ``t`` None → the rule's default (acm 0.7, softmax 1). ``alpha`` and ``metric`` belong to softmax;
    ``against``/``applies`` are the acm rule's switches (recorded; ``acm.rule_merge`` acts on them).
    A file without per-sample MI refuses the acm rule in one line that says how to re-run.
    """
    spec = get_rule(rule)
    t_val = check_t(spec, t)
    clip = _check_clip(clip)
    a = _check_alpha(alpha)
    models = [m.model for m in analysis.models]
    if spec.key == "acm":
        sw = ACM.validate({"t": t_val, "against": against, "applies": applies})
        info = analysis.sample_info
        values = analysis.sample_mi_matrix()                        # [models, points, samples]
        keys = list(info.get("point_groups") or [])
        raw = acm_lambdas(values, t_val)                            # [models, points]
        params = {"t": t_val, "alpha": a, "clip": clip, "metric": None, "against": sw["against"],
                  "applies": sw["applies"]}
    else:
        keys, _, values = _nmi_rows(analysis, metric)
        raw = lambdas(values, t_val, a)
        params = {"t": t_val, "alpha": a, "clip": clip, "metric": metric, "against": None, "applies": None}
    lam = raw if clip is None else np.clip(raw, -np.inf if clip[0] is None else clip[0],
                                           np.inf if clip[1] is None else clip[1])
    return Coefficients(spec.key, params, keys, models, lam, raw, values, analysis)


def acm_curve(analysis, ts) -> np.ndarray:
    """λ of the acm rule for a grid of t: [len(ts), models, points] (the app's live curve; no model work)."""
    return acm_lambdas(analysis.sample_mi_matrix(), np.asarray(ts, dtype=np.float64))


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
                     metric: str = "nmi", rule: str | None = DEFAULT_RULE) -> str:
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
    coef = compute(analysis, rule, t, alpha, clip, metric=metric)
    groups, models, per_model = coef.keys, coef.models, coef.weights()
    blocks = [g for g in groups if g.startswith("block.")]
    prov = analysis.provenance or {}
    if base_model is None:
        base_model = ((prov.get("models") or {}).get("base") or {}).get("model") or "BASE_MODEL"
    entries = []
    for name, lam in zip(models, per_model):
        weight: list[dict[str, Any]] = []
        for group in ("embed", "head.norm", "head"):
            if group in lam:
                for flt in _filters(analysis, group, split_norm="head.norm" in lam):
                    weight.append({"filter": flt, "value": _r(lam[group])})
        weight.append({"value": [_r(lam[b]) for b in blocks]})
        params: dict[str, Any] = {"weight": weight, **sparse_params}
        entries.append({"model": name, "parameters": params})
    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method], "base_model": base_model,
                              "models": entries, "parameters": global_params}
    if dtype:
        config["dtype"] = dtype
    clip = coef.params["clip"]
    t = coef.params["t"]
    if coef.rule == "acm":
        formula = [f"# The paper's rule (arXiv 2505.14009, Eq. 2-3): lambda_k = 1 - mean_j sigmoid(t*(MI_kj - max_j MI_kj)) "
                   f"with t={_r(float(t))}" + (f", clipped to [{clip[0]}, {clip[1]}]" if clip else "") + ",",
                   f"#   from per-sample MI on {coef.values.shape[-1]} calibration samples; weight = lambda/N "
                   f"(N={len(models)}, Eq. 3: theta_0 + (1/N) sum_i lambda_i tau_i)."]
    else:
        formula = [f"# lambda_k = alpha*K*exp(-t*{'NMI' if metric == 'nmi' else 's'}_k)/sum_j exp(-t*"
                   f"{'NMI' if metric == 'nmi' else 's'}_j) with t={_r(float(t))}, alpha={_r(_check_alpha(alpha))}"
                   + (f", clipped to [{clip[0]}, {clip[1]}]" if clip else "") + f", K={len(groups)} groups"
                   + ("." if metric == "nmi" else f"; s = {metric} similarity.")]
    header = [
        "# ACM (Activation-Guided Consensus Merging) coefficients as a mergekit config.",
        *formula,
        f"# weight: one value per decoder block ({len(blocks)} blocks; mergekit's layer gradient hits each block",
        "#   exactly when the list has one value per layer); the embed group (input embeddings, tied",
        "#   output embeddings) and the head group (final norm, lm_head; the acm rule gives the final norm its",
        "#   own value) are carried by the 'filter' entries (substring match on tensor names, first match wins).",
        "# normalize: false = no division by the sum of weights (this project's default)."
        if not global_params.get("normalize") else
        "# normalize: true = divide by the sum of the agreeing models' weights (as this merge's --normalize).",
        *method_notes,
    ]
    for name, lam in zip(models, per_model):
        norm = f", final norm {_r(lam['head.norm'])}" if "head.norm" in lam else ""
        header.append(f"# {name}: embed {_r(lam.get('embed', float('nan')))}{norm}, "
                      f"head {_r(lam.get('head', float('nan')))}")
    header += _head_warning(prov.get("heads") or {})
    if tokenizer_source:
        header += [f"# Tokenizer: this merge carries the tokenizer, chat template and generation defaults of "
                   f"{tokenizer_source}.",
                   "#   Copy those files into mergekit's output; do not use mergekit's tokenizer_source, which",
                   "#   re-maps embedding rows by token text (R1-distilled models reuse ids for other tokens)."]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(header) + "\n" + body


__all__ = ["lambdas", "coefficient_table", "lambdas_by_group", "to_mergekit_yaml", "MERGEKIT_METHODS"]
