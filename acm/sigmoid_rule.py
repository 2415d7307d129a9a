"""The sigmoid coefficient rule: plain merge → per-sample MI of base vs merged → rescale each group's delta.

Origin: a public derivative of the ACM authors' code (quoted in this project's issue 12), **not** the
paper's text. We could not locate that derivative's source in our reference search, so this is
implemented from the issue's description (README "Coefficient rules"):

1. stage 1: a plain merge (any method) into a temporary folder inside the output's temp dir;
2. stage 2: for every calibration sample i (one sequence at a time, no padding) and activation
   point ℓ, MIℓ,ᵢ between the base's and the merged model's activations, then
   sℓ = meanᵢ σ(θ·(MIℓ,ᵢ − maxᵢ MIℓ,ᵢ)) — every argument ≤ 0, so sℓ ∈ (0, ½];
3. stage 3: final = base + (1 − s_g)·(merged − base) per layer group g: a task-arithmetic merge of
   the base with the stage-1 model and λ_g = 1 − s_g, written atomically (``acm.merge.merge_models``).

Activation points (as in the derivative): the input embedding's output, each block's MLP output
(the MLP's down-projection output: ``mlp(x) = down_proj(…)`` in Llama/Qwen/Mistral, ``dropout(c_proj(…))``
in GPT-2, identical in eval mode), the final norm's output (read as the input of the output head) and
the logits. Each point belongs to the group holding its module's weights (``acm.grouping``): embedding →
``embed``; block k's MLP → ``block.k``; final norm → ``head`` (``model.norm`` is registered after the
blocks); logits → ``head``, or ``embed`` when the head is tied to the input embedding. A group with
several points (``head``) takes the mean of their sℓ.

Per-sample MI estimators (same shape of interface as the project's similarity estimators: paired
activations in, one number per group out, plus ``state_bytes``; per sample here, and split into
``keep`` (base pass) / ``update`` (merged pass) so that one model is resident at a time):

* ``LabelMI`` (the derivative's): scikit-learn ``mutual_info_score`` of the flattened values cast
  to bf16 and taken as discrete labels (the bf16 bit pattern is the label). sklearn builds a sparse
  contingency table, so cost is O(n log n) in the values, not #distinct²: 786,432 values (hidden 1536
  × 512 tokens) take 0.21 s CPU, 65,536 take 0.04 s.
* ``BinnedMI``: this project's B-bin joint histogram (``acm.mi``) per sample, ranges fixed per point
  by robust quantiles of the first sample (base and merged separately), so samples are comparable.

What the base pass keeps is bounded: at most ``max_values`` values per (sample, point) (default
2¹⁸; a seeded uniform draw with replacement beyond it, identical in both passes), as int16 labels or
uint8 bins — ≤ 512 KiB per (sample, point).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from acm.errors import ACMError, InputError, is_out_of_memory
from acm.grouping import EMBED, HEAD, block_name, find_group_modules
from acm.rules import SIGMOID, sigmoid_scores

Progress = Callable[[float, str], None]


# ----------------------------------------------------------------------------- estimators


class SampleMI(Protocol):
    """Per-sample MI between base and other activations at activation points.

    ``keep`` runs in the base pass (store what pairing needs), ``update`` in the other model's pass
    (pair with what was kept). ``mi()`` is [points, samples] in nats (NaN where nothing arrived).
    """

    def keep(self, point: int, sample: int, base_act: torch.Tensor) -> None: ...
    def update(self, point: int, sample: int, other_act: torch.Tensor) -> None: ...
    def mi(self) -> np.ndarray: ...
    def state_bytes(self) -> int: ...


class _Subsampled:
    """Shared storage and value subset: at most ``max_values`` flat positions per (point, sample)."""

    def __init__(self, num_points: int, num_samples: int, *, max_values: int = 1 << 18, seed: int = 0):
        self.num_points, self.num_samples = int(num_points), int(num_samples)
        self.max_values = int(max_values)
        self.seed = int(seed)
        self._kept: dict[tuple[int, int], Any] = {}
        self._mi = np.full((self.num_points, self.num_samples), np.nan)

    def flat(self, point: int, sample: int, act: torch.Tensor) -> torch.Tensor:
        """The activation flattened, restricted to the same seeded subset in every pass."""
        v = act.detach().reshape(-1)
        n = v.numel()
        if n <= self.max_values:
            return v
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + point) * 1_000_003 + sample)
        idx = torch.randint(0, n, (self.max_values,), generator=gen).to(v.device)
        return v[idx]

    def _kept_for(self, point: int, sample: int) -> Any:
        try:
            return self._kept.pop((point, sample))
        except KeyError:
            raise ACMError(f"activation point {point}, sample {sample}: no base activations were kept") from None

    def mi(self) -> np.ndarray:
        return self._mi.copy()

    def state_bytes(self) -> int:
        return int(sum(a.nbytes for a in self._kept.values()) + self._mi.nbytes)


class LabelMI(_Subsampled):
    """The derivative's estimator: sklearn ``mutual_info_score`` of flattened bf16 values as labels."""

    key = "labels"

    @staticmethod
    def labels(values: torch.Tensor) -> np.ndarray:
        """bf16 bit patterns (int16) as discrete labels: equal labels ⇔ equal bf16 values."""
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy()

    def keep(self, point: int, sample: int, base_act: torch.Tensor) -> None:
        self._kept[(point, sample)] = self.labels(self.flat(point, sample, base_act))

    def update(self, point: int, sample: int, other_act: torch.Tensor) -> None:
        from sklearn.metrics import mutual_info_score

        x = self._kept_for(point, sample)
        y = self.labels(self.flat(point, sample, other_act))
        if x.shape != y.shape:
            raise ACMError(f"activation point {point}: base and merged activations differ in size")
        self._mi[point, sample] = float(mutual_info_score(x, y))


class BinnedMI(_Subsampled):
    """This project's estimator per sample: a B×B joint histogram (``acm.mi``) of each sample's values."""

    key = "binned"

    def __init__(self, num_points: int, num_samples: int, *, bins: int = 64, max_values: int = 1 << 18,
                 seed: int = 0):
        from acm.mi import check_bins

        super().__init__(num_points, num_samples, max_values=max_values, seed=seed)
        self.bins = check_bins(bins)
        self.x_range: list[tuple[float, float] | None] = [None] * self.num_points
        self.y_range: list[tuple[float, float] | None] = [None] * self.num_points

    def _bins(self, values: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
        from acm.mi import bin_indices

        idx = bin_indices(values, *rng, self.bins)
        return idx.to(torch.uint8 if self.bins <= 256 else torch.int16).cpu()

    def keep(self, point: int, sample: int, base_act: torch.Tensor) -> None:
        from acm.mi import robust_range

        v = self.flat(point, sample, base_act)
        if self.x_range[point] is None:
            self.x_range[point] = robust_range(v, seed=self.seed)
        self._kept[(point, sample)] = self._bins(v, self.x_range[point])

    def update(self, point: int, sample: int, other_act: torch.Tensor) -> None:
        from acm.mi import StreamingMI, robust_range

        ix = self._kept_for(point, sample)
        v = self.flat(point, sample, other_act)
        if self.y_range[point] is None:
            self.y_range[point] = robust_range(v, seed=self.seed)
        iy = self._bins(v, self.y_range[point])
        if ix.shape != iy.shape:
            raise ACMError(f"activation point {point}: base and merged activations differ in size")
        est = StreamingMI(1, self.bins)
        est.add_indices(0, ix.to(torch.int32), iy)
        self._mi[point, sample] = float(est.mi()[0])

    def state_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._kept.values()) + self._mi.nbytes)


def make_estimator(key: str, num_points: int, num_samples: int, *, bins: int = 64, max_values: int = 1 << 18,
                   seed: int = 0) -> SampleMI:
    """The per-sample MI estimator registered under ``key`` (``labels`` or ``binned``)."""
    key = SIGMOID.param("estimator").check(key)
    if key == "labels":
        return LabelMI(num_points, num_samples, max_values=max_values, seed=seed)
    return BinnedMI(num_points, num_samples, bins=bins, max_values=max_values, seed=seed)


# ----------------------------------------------------------------------------- activation points


@dataclass
class Points:
    """The activation points of one model: names, their layer group, and the hooks that feed them."""

    names: list[str]
    groups: list[str]
    _handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for name in ("last_hidden_state", "logits"):
        t = getattr(output, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise ACMError(f"cannot read activations from a module output of type {type(output).__name__}")


def _head_tied(model: torch.nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    w_out, w_in = getattr(out, "weight", None), getattr(inp, "weight", None)
    return w_out is not None and w_in is not None and w_out.data_ptr() == w_in.data_ptr()


def attach_points(model: torch.nn.Module, sink: Callable[[int, torch.Tensor], None]) -> Points:
    """Forward hooks at the rule's activation points, calling ``sink(point, activation)``."""
    mods = find_group_modules(model)
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"unsupported architecture {type(model).__name__}: no output head to read logits from")
    names, groups, handles = [], [], []

    def out_hook(i: int):
        def hook(_m, _inp, out) -> None:   # returns None: a hook's return value would replace the output
            sink(i, _tensor(out))
        return hook

    def in_hook(i: int):
        def hook(_m, inp) -> None:
            sink(i, _tensor(inp))
        return hook

    names.append("embed")
    groups.append(EMBED)
    handles.append(mods.embed.register_forward_hook(out_hook(0)))
    for k, block in enumerate(mods.blocks):
        mlp = getattr(block, "mlp", None)
        i = len(names)
        names.append(f"{block_name(k)}.mlp" if mlp is not None else block_name(k))
        groups.append(block_name(k))
        handles.append((mlp if mlp is not None else block).register_forward_hook(out_hook(i)))
    i_norm = len(names)
    names.append("final_norm")
    groups.append(HEAD)
    handles.append(head.register_forward_pre_hook(in_hook(i_norm)))
    names.append("logits")
    groups.append(EMBED if _head_tied(model) else HEAD)
    handles.append(head.register_forward_hook(out_hook(len(names) - 1)))
    return Points(names=names, groups=groups, _handles=handles)


def _run(model: torch.nn.Module, ids: list[list[int]], sink: Callable[[int, int, torch.Tensor], None],
         step: Callable[[], None]) -> tuple[list[str], list[str]]:
    """Every sample through ``model`` one at a time, with hooks feeding ``sink(point, sample, act)``."""
    current = [0]
    points = attach_points(model, lambda p, act: sink(p, current[0], act))
    device = model.get_input_embeddings().weight.device
    try:
        with torch.inference_mode():
            for i, seq in enumerate(ids):
                current[0] = i
                model(input_ids=torch.tensor([seq], device=device), use_cache=False)
                step()
    finally:
        points.remove()
    return points.names, points.groups


def group_scores(point_scores: np.ndarray, point_groups: list[str], groups: list[str]) -> dict[str, float]:
    """s per layer group = the mean of its activation points' s (a group with none keeps s = 0: all its delta)."""
    out = {}
    for g in groups:
        vals = [float(s) for s, pg in zip(point_scores, point_groups) if pg == g]
        out[g] = float(np.mean(vals)) if vals else 0.0
    return out


# ----------------------------------------------------------------------------- the workflow


@dataclass
class RuleAnalysis:
    """Stage 2's result: MI per (point, sample), sℓ per point and per group, and provenance."""

    points: list[str]
    point_groups: list[str]
    mi: np.ndarray                  # [points, samples], nats
    point_scores: np.ndarray        # sℓ per point
    group_scores: dict[str, float]  # s per layer group (the merge's λ_g = 1 − s_g)
    provenance: dict

    def to_dict(self) -> dict:
        return {"points": self.points, "point_groups": self.point_groups,
                "mi_mean": [round(float(x), 6) for x in self.mi.mean(axis=1)],
                "mi_max": [round(float(x), 6) for x in self.mi.max(axis=1)],
                "s_points": [round(float(x), 6) for x in self.point_scores],
                "s": {g: round(v, 6) for g, v in self.group_scores.items()}, "provenance": self.provenance}


def analyze_merged(base: Any, merged: Any, calibration: Any, *, theta: float = 0.7, estimator: str = "labels",
                   bins: int = 64, max_values: int = 1 << 18, field: str | None = None, split: str = "train",
                   samples: int | None = None, clusters: int = 20, fraction: float = 0.1, max_tokens: int = 512,
                   seed: int = 0, device: str | None = None, dtype: str | None = None, chat_template: bool = True,
                   allow_pickle: bool = False, progress: Progress | None = None,
                   show_progress: bool = True, calibration_label: str | None = None) -> RuleAnalysis:
    """Stage 2: per-sample MI between base and merged activations and the sigmoid scores sℓ.

    One model resident at a time: the base selects and encodes the calibration samples (as
    ``acm analyze`` does), runs over them keeping what the estimator needs, is released; then the
    merged model runs over the same token ids.
    """
    from tqdm.auto import tqdm

    from acm.analysis import _release_memory, _weight_ref, check_finite_weights
    from acm.calibration import check_max_tokens, check_sampling, describe_source, encode, load_texts, select_samples
    from acm.grouping import group_names
    from acm.models import ModelSource, load_causal_lm, parse_dtype, resolve_model

    params = SIGMOID.validate({"theta": theta, "estimator": estimator, "bins": bins, "max_values": max_values})
    check_max_tokens(max_tokens)
    check_sampling(clusters=clusters, fraction=fraction, samples=samples)
    torch_dtype = parse_dtype(dtype)
    t_start = time.perf_counter()

    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(float(min(1.0, max(0.0, frac))), msg)

    base_src = base if isinstance(base, ModelSource) else resolve_model(str(base), allow_pickle=allow_pickle)
    merged_src = merged if isinstance(merged, ModelSource) else resolve_model(str(merged), allow_pickle=allow_pickle)
    texts = load_texts(calibration, field=field, split=split)
    report(0.0, "loading the base model")
    try:
        model, tokenizer = load_causal_lm(base_src, device=device, dtype=torch_dtype)
        check_finite_weights(model, "base model", base_src.spec)
        report(0.05, "selecting calibration samples")
        selected = select_samples(texts, model, tokenizer, clusters=clusters, fraction=fraction, samples=samples,
                                  max_tokens=max_tokens, seed=seed)
        ids = [x for x in encode(selected, tokenizer, max_tokens=max_tokens, chat_template=chat_template) if x]
        if not ids:
            raise InputError("every calibration text encoded to zero tokens")
        num_points = find_group_modules(model).num_layers + 3
        est = make_estimator(params["estimator"], num_points, len(ids), bins=params["bins"],
                             max_values=params["max_values"], seed=seed)
        total = 2 * len(ids)
        done = [0]
        bar = tqdm(total=total, desc="sigmoid rule: MI", unit="sample",
                   disable=not show_progress or progress is not None)

        def step() -> None:
            done[0] += 1
            bar.update(1)
            who = "base" if done[0] <= len(ids) else "merged"
            report(0.1 + 0.9 * done[0] / total, f"{who}: sample {(done[0] - 1) % len(ids) + 1}/{len(ids)}")

        try:
            names, point_groups = _run(model, ids, est.keep, step)
            stored = est.state_bytes()
            weight, model = _weight_ref(model), None
            _release_memory(weight)
            report(0.1 + 0.9 * done[0] / total, "loading the merged model")
            model, _ = load_causal_lm(merged_src, device=device, dtype=torch_dtype)
            _run(model, ids, est.update, step)
        finally:
            bar.close()
            model = None
    except ACMError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ACMError("out of memory in the sigmoid rule's analysis: use fewer or shorter calibration "
                           "samples (--samples, --max-tokens) or a device with more memory") from None
        raise
    mi = est.mi()
    s_points = sigmoid_scores(mi, params["theta"])
    groups = group_names(base_src.num_layers)
    prov = {"rule": "sigmoid", "theta": params["theta"], "estimator": params["estimator"],
            "bins": params["bins"] if params["estimator"] == "binned" else None,
            "max_values": params["max_values"], "seed": int(seed),
            "calibration": {"source": calibration_label or describe_source(calibration), "field": field, "split": split,
                            "available": len(texts), "samples": len(ids), "tokens": int(sum(map(len, ids))),
                            "requested_samples": samples, "clusters": clusters, "fraction": fraction,
                            "max_tokens": max_tokens},
            "stored_base_bytes": int(stored), "residency": "one model at a time (base pass, then merged)",
            "seconds": round(time.perf_counter() - t_start, 3)}
    return RuleAnalysis(points=names, point_groups=point_groups, mi=mi, point_scores=s_points,
                        group_scores=group_scores(s_points, point_groups, groups), provenance=prov)


@dataclass
class RuleMergeReport:
    """What ``merge_with_sigmoid_rule`` did: the final merge (as a ``MergeReport``), stage 2, timings."""

    merge: Any                     # acm.merge.MergeReport of the final model (out_dir, recipe, … of the output)
    analysis: RuleAnalysis
    stage_seconds: dict[str, float]

    @property
    def out_dir(self) -> Path:
        return self.merge.out_dir

    @property
    def scales(self) -> dict[str, float]:
        """λ_g = 1 − s_g: the fraction of each group's delta the final model keeps."""
        return {g: 1.0 - s for g, s in self.analysis.group_scores.items()}


def rule_block(analysis: RuleAnalysis) -> dict:
    """The recipe's record of the rule (acm_recipe.json ``rule``; rendered in the model card)."""
    return {"key": "sigmoid", "label": SIGMOID.label, "formula": SIGMOID.formula, "source": SIGMOID.source,
            "theta": analysis.provenance["theta"], "estimator": analysis.provenance["estimator"],
            "bins": analysis.provenance["bins"], "max_values": analysis.provenance["max_values"],
            "s": {g: round(v, 6) for g, v in analysis.group_scores.items()},
            "scale": {g: round(1.0 - v, 6) for g, v in analysis.group_scores.items()},
            "points": analysis.to_dict(), "calibration": analysis.provenance["calibration"]}


def merge_with_sigmoid_rule(base: Any, fts: list[Any], out_dir: str | Path, options: Any, *, calibration: Any,
                            theta: float = 0.7, estimator: str = "labels", bins: int = 64,
                            max_values: int = 1 << 18, field: str | None = None, split: str = "train",
                            samples: int | None = None, clusters: int = 20, fraction: float = 0.1,
                            max_tokens: int = 512, seed: int = 0, analysis_device: str | None = None,
                            dtype: str | None = None, chat_template: bool = True, force: bool = False,
                            allow_pickle: bool = False, progress: Progress | None = None,
                            show_progress: bool = True) -> RuleMergeReport:
    """The whole two-stage workflow in one call: plain merge, analysis of base vs merged, rescale.

    Everything happens inside one temp dir next to ``out_dir`` (``acm.shards.AtomicFolder``): the
    stage-1 model and the stage-3 output are written there, the stage-1 model is deleted and the
    output renamed into place only when all stages succeeded — a failure leaves nothing at ``out_dir``.
    """
    from acm.merge import MergeOptions, merge_models
    from acm.shards import AtomicFolder

    params = SIGMOID.validate({"theta": theta, "estimator": estimator, "bins": bins, "max_values": max_values})
    fts = list(fts) if isinstance(fts, (list, tuple)) else [fts]
    options.validate(len(fts))

    def sub(lo: float, hi: float, name: str) -> Progress | None:
        if progress is None:
            return None
        return lambda f, m: progress(lo + (hi - lo) * float(f), f"{name}: {m}")

    from acm.calibration import check_max_tokens, check_sampling, describe_source, load_texts

    check_max_tokens(max_tokens)
    check_sampling(clusters=clusters, fraction=fraction, samples=samples)
    label = describe_source(calibration)
    texts = load_texts(calibration, field=field, split=split)   # a bad source fails before any merge work
    stage_seconds: dict[str, float] = {}
    folder = AtomicFolder(out_dir, force=force)
    with folder as tmp:
        t0 = time.perf_counter()
        stage1 = tmp / "stage1-plain-merge"
        first = merge_models(base, fts, stage1, options, allow_pickle=allow_pickle,
                             progress=sub(0.0, 0.3, "stage 1/3 plain merge"), show_progress=show_progress)
        stage_seconds["merge"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        analysis = analyze_merged(base, stage1, texts, calibration_label=label, field=field, split=split,
                                  samples=samples,
                                  clusters=clusters, fraction=fraction, max_tokens=max_tokens, seed=seed,
                                  device=analysis_device, dtype=None, chat_template=chat_template,
                                  allow_pickle=allow_pickle, progress=sub(0.3, 0.7, "stage 2/3 MI base vs merged"),
                                  show_progress=show_progress, **params)
        stage_seconds["analysis"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        scale = {g: 1.0 - s for g, s in analysis.group_scores.items()}
        rescale = MergeOptions(method="task_arithmetic", alpha=1.0, dtype=options.dtype, shard_size=options.shard_size,
                               device=options.device, threads=options.threads, tokenizer_from="ft")
        stage3 = tmp / "stage3-rescaled"
        final = merge_models(base, [str(stage1)], stage3, rescale, lambdas=[scale], allow_pickle=allow_pickle,
                             progress=sub(0.7, 0.98, "stage 3/3 rescale"), show_progress=show_progress)
        stage_seconds["rescale"] = round(time.perf_counter() - t0, 3)
        # The record describes the user's merge (stage 1's sources, method, options) plus the rule,
        # with stage 3's output facts; no temp path survives into it.
        recipe = dict(first.recipe)
        recipe["rule"] = {**rule_block(analysis), "stage_seconds": stage_seconds}
        first_out = first.recipe.get("output") or {}
        recipe["output"] = {**(final.recipe.get("output") or {}),
                            **{k: first_out[k] for k in ("heads", "tokenizer") if k in first_out}}
        recipe["name"] = Path(out_dir).name
        _write_record(stage3, recipe)
        for entry in stage3.iterdir():
            entry.rename(tmp / entry.name)
        shutil.rmtree(stage1, ignore_errors=True)
        stage3.rmdir()
        target = folder.commit()
    final.out_dir = target
    final.recipe = recipe
    final.options = options
    final.lambdas = first.lambdas
    if progress is not None:
        progress(1.0, "sigmoid rule: done")
    return RuleMergeReport(merge=final, analysis=analysis, stage_seconds=stage_seconds)


def _write_record(folder: Path, recipe: dict) -> None:
    from acm.export import model_card

    (folder / "acm_recipe.json").write_text(json.dumps(recipe, indent=2, ensure_ascii=False, default=str) + "\n",
                                            encoding="utf-8")
    (folder / "README.md").write_text(model_card(recipe), encoding="utf-8")


__all__ = ["BinnedMI", "LabelMI", "RuleAnalysis", "RuleMergeReport", "SampleMI", "analyze_merged", "attach_points",
           "group_scores", "make_estimator", "merge_with_sigmoid_rule", "rule_block"]
