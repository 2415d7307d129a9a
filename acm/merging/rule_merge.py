"""A merge driven by the acm rule's switches: MI against the fine-tuned models or a plain merge, λ on the
task vectors or on the plain merge's delta.

Why one workflow for four settings: the paper's text (MI base vs each fine-tuned model, λ weights each
task vector with 1/N — Eq. 3) and a public derivative of the authors' code (MI base vs an already merged
model, base + λ·(merged − base)) differ in exactly two choices, so both are the same rule with two
switches (``acm.rules.ACM``):

=================  =================  ================================================================
against            applies            what runs
=================  =================  ================================================================
fine-tuned         task-vectors       one merge: θ₀ + (1/N)·Σᵢ λᵢ·τᵢ (λ from the given analysis)
fine-tuned         merged-delta       plain merge → base + λ̄·(merged − base), λ̄ = mean of λᵢ over models
merged             merged-delta       plain merge → per-sample MI base vs merged → base + λ·(merged − base)
merged             task-vectors       plain merge → per-sample MI base vs merged → θ₀ + (1/N)·Σᵢ λ·τᵢ
=================  =================  ================================================================

Everything happens inside one temp dir next to ``out_dir`` (``acm.checkpoints.shards.AtomicFolder``): a stage-1
model is written there and deleted, and the output is renamed into place only when every stage
succeeded — a failure leaves nothing at ``out_dir``. The per-sample MI of the merged variants is the
same analysis (``acm.activations.analysis.analyze`` with no similarity metric) the paper's setting uses.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acm.errors import InputError
from acm.rules import ACM

Progress = Callable[[float, str], None]
STAGE1 = "plain merge (stage 1)"


@dataclass
class RuleMergeReport:
    """What ``merge_with_rule`` did: the final merge (``MergeReport``), the coefficients, stage timings."""

    merge: Any                     # acm.merging.engine.MergeReport of the final model (out_dir, recipe, …)
    coefficients: Any              # acm.rules.coefficients.Coefficients
    stage_seconds: dict[str, float]

    @property
    def out_dir(self) -> Path:
        return self.merge.out_dir

    @property
    def lambdas(self) -> dict[str, float]:
        """λ per key of the first model (the merged-delta settings have one λ per key for all models)."""
        return self.coefficients.by_model()[0]


def _sub(progress: Progress | None, lo: float, hi: float, name: str) -> Progress | None:
    if progress is None:
        return None
    return lambda f, m: progress(lo + (hi - lo) * float(f), f"{name}: {m}")


def merge_with_rule(base: Any, fts: list[Any], out_dir: str | Path, options: Any, *, t: float = 0.7,
                    against: str = "fine-tuned", applies: str = "task-vectors", analysis: Any = None,
                    calibration: Any = None, clip=None, estimator: str = "labels", bins: int = 64,
                    max_values: int | None = 1 << 18, analysis_options: dict | None = None,
                    force: bool = False, allow_pickle: bool = False, progress: Progress | None = None,
                    show_progress: bool = True) -> RuleMergeReport:
    """Merge ``fts`` into ``base`` with the acm rule at ``t`` under the two switches (see module doc).

    ``analysis`` (base vs each fine-tuned model, with per-sample MI) is needed when ``against`` is
    ``fine-tuned``; ``calibration`` (any ``acm.activations.calibration.load_texts`` source) when it is ``merged``,
    with ``analysis_options`` passed on to ``acm.activations.analysis.analyze`` (samples, clusters, max_tokens, …).
    """
    from acm.checkpoints.shards import AtomicFolder
    from acm.merging.engine import merge_models
    from acm.rules.coefficients import compute

    sw = ACM.validate({"t": t, "against": against, "applies": applies, "estimator": estimator, "bins": bins,
                       "max_values": 0 if max_values is None else max_values})     # None = every value
    fts = list(fts) if isinstance(fts, (list, tuple)) else [fts]
    options.validate(len(fts))
    if sw["against"] == "fine-tuned":
        if analysis is None:
            raise InputError("the acm rule with MI against the fine-tuned models needs an analysis of base vs "
                             "each fine-tuned model (acm analyze; --acm FILE)")
        if len(analysis.models) != len(fts):
            raise InputError(f"the analysis covers {len(analysis.models)} fine-tuned model(s) but {len(fts)} "
                             "are merged; pass the same models, in the same order")
        coef = compute(analysis, "acm", sw["t"], clip=clip, against=sw["against"], applies=sw["applies"])
        if sw["applies"] == "task-vectors":
            report = merge_models(base, fts, out_dir, options, lambdas=coef.weights(), acm=coef.entry(),
                                  force=force, allow_pickle=allow_pickle, progress=progress,
                                  show_progress=show_progress)
            return RuleMergeReport(merge=report, coefficients=coef, stage_seconds={"merge": round(report.seconds, 3)})
    elif calibration is None:
        raise InputError("the acm rule with MI against a plain merge needs calibration text (--calibration)")
    else:
        from acm.activations.calibration import load_texts

        aopts = dict(analysis_options or {})
        load_texts(calibration, field=aopts.get("field"), split=aopts.get("split", "train"))  # fail before merging

    stage_seconds: dict[str, float] = {}
    folder = AtomicFolder(out_dir, force=force)
    with folder as tmp:
        t0 = time.perf_counter()
        stage1 = tmp / "stage1-plain-merge"
        first = merge_models(base, fts, stage1, options, allow_pickle=allow_pickle,
                             progress=_sub(progress, 0.0, 0.3, "stage 1/3 plain merge"), show_progress=show_progress)
        stage_seconds["merge"] = round(time.perf_counter() - t0, 3)
        if sw["against"] == "merged":
            from acm.activations.analysis import analyze

            t0 = time.perf_counter()
            merged_analysis = analyze(base, [str(stage1)], calibration, metrics=[], sample_mi=sw["estimator"],
                                      sample_max_values=sw["max_values"], bins=sw["bins"],
                                      allow_pickle=allow_pickle, show_progress=show_progress,
                                      progress=_sub(progress, 0.3, 0.7, "stage 2/3 MI base vs merged"),
                                      **(analysis_options or {}))
            merged_analysis.models[0].model = STAGE1
            coef = compute(merged_analysis, "acm", sw["t"], clip=clip, against=sw["against"], applies=sw["applies"])
            stage_seconds["analysis"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        final = _final_stage(base, fts, stage1, tmp, coef, options, sw, allow_pickle, progress, show_progress)
        stage_seconds["final"] = round(time.perf_counter() - t0, 3)
        recipe = _record(first.recipe, final.recipe, coef, sw, stage_seconds, Path(out_dir).name, stage1)
        _write_record(tmp / "stage3", recipe)
        for entry in (tmp / "stage3").iterdir():
            entry.rename(tmp / entry.name)
        shutil.rmtree(stage1, ignore_errors=True)
        (tmp / "stage3").rmdir()
        target = folder.commit()
    final.out_dir, final.recipe, final.options = target, recipe, options
    if progress is not None:
        progress(1.0, "acm rule: done")
    return RuleMergeReport(merge=final, coefficients=coef, stage_seconds=stage_seconds)


def _final_stage(base, fts, stage1: Path, tmp: Path, coef, options, sw: dict, allow_pickle: bool,
                 progress: Progress | None, show_progress: bool):
    """Stage 3: base + λ·(stage 1 − base), or θ₀ + (1/N)·Σ λ·τᵢ with the merged-variant λ."""
    from acm.merging.engine import MergeOptions, merge_models

    prog = _sub(progress, 0.7, 0.98, "stage 3/3 apply λ")
    if sw["applies"] == "merged-delta":
        rescale = MergeOptions(method="task_arithmetic", alpha=1.0, dtype=options.dtype, shard_size=options.shard_size,
                               device=options.device, threads=options.threads, tokenizer_from="ft")
        return merge_models(base, [str(stage1)], tmp / "stage3", rescale, lambdas=[coef.mean_over_models()],
                            allow_pickle=allow_pickle, progress=prog, show_progress=show_progress)
    lam = coef.mean_over_models()
    weights = [{k: v / len(fts) for k, v in lam.items()} for _ in fts]
    return merge_models(base, fts, tmp / "stage3", options, lambdas=weights, allow_pickle=allow_pickle,
                        progress=prog, show_progress=show_progress)


def _record(first: dict, final: dict, coef, sw: dict, stage_seconds: dict, name: str, stage1: Path) -> dict:
    """The user's merge (stage 1's sources, method, options) plus the rule, with the final output's facts;
    no temp path survives into it (the stage-1 folder is named ``plain merge (stage 1)`` wherever it appears)."""
    recipe = dict(first) if sw["applies"] == "merged-delta" else dict(final)
    recipe["acm"] = True
    recipe["acm_analysis"] = {**coef.entry(), "stage_seconds": stage_seconds,
                              "estimator": sw["estimator"], "max_values": sw["max_values"]}
    if sw["applies"] == "merged-delta":
        lam = coef.mean_over_models()
        recipe["lambdas"] = [{"model": STAGE1, "lambda": lam}]
        first_out = first.get("output") or {}
        recipe["output"] = {**(final.get("output") or {}),
                            **{k: first_out[k] for k in ("heads", "tokenizer") if k in first_out}}
    recipe["name"] = name
    text = json.dumps(recipe, ensure_ascii=False, default=str)
    for spelling in {str(stage1), str(stage1.resolve())}:
        text = text.replace(json.dumps(spelling, ensure_ascii=False)[1:-1], STAGE1)
    return json.loads(text)


def _write_record(folder: Path, recipe: dict) -> None:
    from acm.merging.export import model_card

    (folder / "acm_recipe.json").write_text(json.dumps(recipe, indent=2, ensure_ascii=False, default=str) + "\n",
                                            encoding="utf-8")
    (folder / "README.md").write_text(model_card(recipe), encoding="utf-8")


__all__ = ["RuleMergeReport", "merge_with_rule"]
