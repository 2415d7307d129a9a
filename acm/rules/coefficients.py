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

from typing import Any

import numpy as np

from acm.errors import InputError
from acm.rules import ACM, DEFAULT_RULE, acm_lambdas, check_t, get_rule
from acm.rules.fim import FIM, fim_lambdas, fim_scores
from acm.rules.registry import _check_clip
from acm.rules.softmax import _check_alpha, lambdas


# Our merge-method names → mergekit's (from the registry, acm.merging.methods; "dare_linear" is accepted as a name too).
def _nmi_rows(analysis, metric: str = "nmi") -> tuple[list[str], list[str], np.ndarray]:
    """(groups, models, [n_models, K] similarity of ``metric``) — the sₖ that drive λ."""
    groups = list(analysis.groups)
    models = [m.model for m in analysis.models]
    if metric == "nmi":
        return groups, models, analysis.nmi_matrix()
    return groups, models, analysis.similarity_matrix(metric)


def coefficient_table(analysis, t: float | None = None, alpha: float = 1.0, clip=None, *, metric: str = "nmi",
                      rule: str | None = DEFAULT_RULE, against: str = "fine-tuned",
                      applies: str = "task-vectors", score: str = "fisher-delta") -> dict:
    """Everything a user needs to see for one t: what drives λ, and λ per (model, λ key).

    softmax: ``{"rule", "t", "alpha", "clip", "metric", "groups", "formula", "models": [{"model",
    "mean_lambda", "groups": [{"name", "similarity", "<metric>", "lambda", "lambda_unclipped"?,
    "clipped"?}]}]}`` (the similarity is under both "similarity" and the metric's key, e.g. "nmi").
    acm: the same shape with, per row, the activation point, its per-sample MI (mean, std, max, nats)
    and the task-vector ``weight`` the merge applies (λ/N); plus "against", "applies", "scale".
    """
    if np.ndim(t) != 0:
        raise InputError("coefficient_table takes one t (use lambdas() / acm_curve() for a grid)")
    c = compute(analysis, rule, t, alpha, clip, metric=metric, against=against, applies=applies, score=score)
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
            elif c.rule == "fim":
                fb = c.analysis.fisher
                row.update({"fisher": float(fb["scores"][k]), "delta_sq": float(fb["delta_sq"][i][k]),
                            "score": float(c.values[i, k]), "lambda": float(c.lambdas[i, k]),
                            "weight": float(c.lambdas[i, k])})
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
    if c.rule == "fim":
        fb = c.analysis.fisher
        return {"rule": "fim", "t": c.params["t"], "score": c.params["score"], "clip": clip_out,
                "groups": list(c.keys), "fisher": {k: fb.get(k) for k in ("sequences", "length", "seed", "loss")},
                "formula": "alpha_k = sigmoid(-t*z_k), z = standardised log(F_k*|delta_k|^2) over the layers "
                           "(F_k alone with score fisher-only); theta = theta_0 + sum_i alpha_ik tau_ik, clipped after",
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

    def _fim_entry(self) -> dict:
        """The fim rule's part of the recipe entry: its switch, the Fisher pass settings, per key F, ‖δ‖², α."""
        fb = self.analysis.fisher
        settings = {k: fb.get(k) for k in ("sequences", "length", "seed", "loss", "vocab", "dtype", "device")}
        return {"rule": "fim", "score": self.params["score"], "fisher": settings, "groups": list(self.keys),
                "fisher_scores": [float(x) for x in fb["scores"]],
                "delta_sq": {str(m): [float(x) for x in row] for m, row in zip(self.models, fb["delta_sq"])},
                "lambda": {str(m): [round(float(x), 6) for x in row] for m, row in zip(self.models, self.lambdas)}}

    def entry(self, source: str | None = None) -> dict:
        """The recipe's ``acm`` entry (``merge_models(acm=…)``): rule, parameters, λ and their inputs."""
        a, p = self.analysis, self.params
        out: dict[str, Any] = {"analysis": a.provenance, "t": p["t"], "alpha": p["alpha"],
                               "clip": list(p["clip"]) if p["clip"] else None}
        if source is not None:
            out["source"] = str(source)
        if self.rule == "fim":
            return {**out, **self._fim_entry()}
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
        mi = self.values                  # the per-sample MI λ was computed from: [models, points, samples]
        out.update({"rule": "acm", "against": p["against"], "applies": p["applies"], "scale": self.scale,
                    "estimator": info.get("estimator"), "max_values": info.get("max_values"),
                    "groups": list(self.keys), "points": list(info.get("points") or []),
                    "samples": int(mi.shape[-1]),
                    "lambda": {str(m): [round(float(x), 6) for x in row] for m, row in zip(self.models, self.lambdas)},
                    "mi_mean": {str(m): [round(float(x), 6) for x in row]
                                for m, row in zip(self.models, mi.mean(axis=-1))}})
        from acm.rules.bands import analysis_band  # 90 % bootstrap band of λ, seeded (docs/calibration_bands.md)

        out["band"] = analysis_band(a, p["t"], clip=p["clip"]).to_dict()
        return out


def compute(analysis, rule: str | None = DEFAULT_RULE, t: float | None = None, alpha: float = 1.0, clip=None, *,
            metric: str = "nmi", against: str = "fine-tuned", applies: str = "task-vectors",
            score: str = "fisher-delta") -> Coefficients:
    """λ of ``rule`` at ``t`` for every fine-tuned model of ``analysis`` — the one path app, CLI and tuner use.

    ``t`` None → the rule's default (acm 0.7, softmax 1). ``alpha`` and ``metric`` belong to softmax;
    ``against``/``applies`` are the acm rule's switches (recorded; ``acm.merging.rule_merge`` acts on them);
    ``score`` the fim rule's Fisher-only switch (``fisher-delta`` or ``fisher-only``, ``acm.rules.fim``).
    A file without per-sample MI (or without a Fisher pass, for fim) refuses in one line that says how to re-run.
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
    elif spec.key == "fim":
        keys, fisher, delta = analysis.fisher_arrays()
        sw = FIM.validate({"t": t_val, "score": score})
        values = fim_scores(fisher, delta, sw["score"])               # [models, keys]
        raw = fim_lambdas(values, t_val)
        params = {"t": t_val, "alpha": a, "clip": clip, "metric": None, "against": None, "applies": None,
                  "score": sw["score"]}
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


__all__ = ["Coefficients", "acm_curve", "coefficient_table", "compute", "lambdas", "lambdas_by_group"]
