"""Activation analysis: per-layer-group similarity and per-sample MI between the base and each fine-tuned model.

Why it is built this way: ACM needs, for every layer group, how much information the fine-tuned
model's activations still share with the base's on the same calibration tokens, and real pairs
(2 × 15 GB for 7B models in bf16) do not fit one device together. So **one model is resident at
a time**: the base is loaded, selects and encodes the calibration samples (its tokenizer and
chat template), and runs over every batch with forward hooks that bin its activations and keep
only the bin indices (uint8 for B ≤ 256, else int16, on the CPU); it is then released (``gc``,
``torch.cuda.empty_cache``) and each fine-tuned model in turn is loaded, run over the same
batches, binned with its own ranges and paired with the stored base bins in a B×B joint histogram
(``acm.activations.mi.StreamingMI``). Ranges are set exactly as before (robust quantiles of the first batch,
per model and group).

What is stored is bounded by a per-group **pair budget** P (default 2²² values = 4 MiB of uint8
per group): while a group has at most P real (token, feature) positions in the whole calibration
set, every one is kept and the histogram is exactly the all-models-at-once one; beyond that, a
seeded uniform draw with replacement of P positions (split over batches by their token counts,
drawn from a generator seeded by (seed, group, batch)) is kept, identical in every pass, so pairs
line up. Memory ≈ one model + one batch's activations (incl. its logits) + groups × (P bytes +
B² counters); cost ≈ the plain forward passes, since binning is a few element-wise passes.

Why not block by block: a block-wise pipeline would re-implement each architecture's forward
(masks, rotary positions, caches) outside transformers. For a model larger than the device,
``device="auto"`` already uses accelerate's big-model placement (``device_map="auto"`` with CPU
offload, ``acm.checkpoints.models.load_causal_lm``); the hooks work unchanged on the offloaded modules.

The hooks live in ``acm.activations.capture``, the result format in ``acm.activations.result``; this
module is the orchestration: options, the order of work, the passes, the record.

Groups (see ``acm.checkpoints.grouping``): ``embed`` → output of the input embedding; ``block.k`` → output
hidden states of block k (``output[0]`` when a tuple); ``head`` → logits restricted to a fixed
seeded random subset of at most 4,096 vocabulary ids. Padding positions are excluded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import acm
from acm.activations.calibration import (
    check_max_tokens,
    check_sampling,
    describe_source,
    encode,
    load_texts,
    pad_batches,
    pad_token_id,
    select_samples,
)
from acm.activations.capture import (
    DEFAULT_PAIR_BUDGET,
    DEFAULT_ROW_BUDGET,
    GroupCapture,
    SampleCapture,
    attach_groups,
    attach_points,
    check_pair_budget,
    head_ids,
    input_device,
    point_names,
)
from acm.activations.mi import QUANTILES, StreamingMI, check_bins
from acm.activations.result import AnalysisResult, ModelNMI
from acm.activations.sample_mi import DEFAULT_MAX_VALUES, check_estimator, make_estimator
from acm.activations.similarity import DEFAULT_SKETCH_DIM, METRICS, metric_label, parse_metrics
from acm.checkpoints.compatibility import check_compatibility
from acm.checkpoints.grouping import EMBED, HEAD, build_group_map, group_names
from acm.checkpoints.models import ModelSource, fetch_all, load_causal_lm, parse_dtype, resolve_model
from acm.checkpoints.residency import peak_rss_bytes, release_memory, weight_ref
from acm.checkpoints.tensors import finite
from acm.errors import ACMError, InputError, OutOfMemoryAdvice, is_out_of_memory

Progress = Callable[[float, str], None]


@dataclass
class AnalysisOptions:
    """Every setting of an analysis (the CLI's flags, the app's controls), checked by ``validate``.

    ``metrics``: keys of ``acm.activations.similarity.METRICS`` (None → NMI; ``[]`` → none, per-sample MI
    only); row metrics pair at most ``row_budget`` tokens per group, projected to ``sketch_dim``.
    ``sample_mi``: the per-sample MI estimator at the paper's activation points (``labels``,
    ``binned`` or None), at most ``sample_max_values`` values per (sample, point) (None: all).
    ``pair_budget``: NMI's paired values per group (``acm.activations.capture.GroupCapture``).
    """

    field: str | None = None
    split: str = "train"
    samples: int | None = None
    clusters: int = 20
    fraction: float = 0.1
    max_tokens: int = 512
    bins: int = 64
    batch_size: int = 4
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    chat_template: bool = True
    allow_pickle: bool = False
    trust_remote_code: bool = False
    padding_side: str = "right"
    pair_budget: int = DEFAULT_PAIR_BUDGET
    metrics: str | list[str] | tuple[str, ...] | None = None
    sketch_dim: int = DEFAULT_SKETCH_DIM
    row_budget: int = DEFAULT_ROW_BUDGET
    sample_mi: str | None = "labels"
    sample_max_values: int | None = DEFAULT_MAX_VALUES

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self) -> tuple[list[str], str | None, torch.dtype | None]:
        """(metric keys, per-sample estimator or None, torch dtype); one InputError line otherwise."""
        check_bins(self.bins)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) \
                or self.batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        check_max_tokens(self.max_tokens)
        check_sampling(clusters=self.clusters, fraction=self.fraction, samples=self.samples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        check_pair_budget(self.pair_budget)
        check_pair_budget(self.row_budget, "row_budget")
        if isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, (int, np.integer)) \
                or self.sketch_dim < 1:
            raise InputError(f"sketch_dim must be an integer >= 1, got {self.sketch_dim!r}")
        if self.padding_side not in ("right", "left"):
            raise InputError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        keys = [] if isinstance(self.metrics, (list, tuple)) and not self.metrics else parse_metrics(self.metrics)
        sample_key = None if self.sample_mi in (None, "", "off", "none") else check_estimator(self.sample_mi)
        if not keys and sample_key is None:
            raise InputError("nothing to measure: give a similarity metric or a per-sample MI estimator")
        return keys, sample_key, parse_dtype(self.dtype)


def _oom_advice(where: str, device: str, batch_size: int, max_tokens: int, n: int) -> OutOfMemoryAdvice:
    """One line that says what to change; names both the CLI flags and the app's controls."""
    return OutOfMemoryAdvice(
        f"out of memory on {device} while {where} (batch size {batch_size}, {n} samples, up to {max_tokens} "
        f"tokens each): use a smaller batch size (--batch-size), fewer samples (--samples) or fewer max "
        f"tokens (--max-tokens)")


def check_finite_weights(model: torch.nn.Module, role: str, spec: str) -> None:
    """Refuse a loaded model with NaN/Inf parameters before any forward pass.

    Why: NaN weights do not crash a forward pass; they quietly turn activations into NaN, which the
    histograms would bin as an extreme value and report as a plausible-looking NMI. One ``aminmax``
    per parameter (NaN and Inf propagate to the min or max) reads each weight once and allocates
    nothing the size of a parameter.
    """
    with torch.inference_mode():
        for name, p in model.named_parameters():
            if p.device.type != "meta" and not finite(p.detach()):
                raise InputError(f"{role} {spec} has NaN/Inf values in {name}; this checkpoint is broken, "
                                 "analyse a healthy one")


def _reporter(progress: Progress | None) -> Progress:
    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(float(min(1.0, max(0.0, frac))), msg)
    return report


def _source(spec: str | ModelSource, o: AnalysisOptions) -> ModelSource:
    if isinstance(spec, ModelSource):
        return spec
    return resolve_model(spec, allow_pickle=o.allow_pickle, trust_remote_code=o.trust_remote_code)


@dataclass
class _Fed:
    """What the base selected and encoded: the exact token ids (and their texts) every model is fed."""

    model: torch.nn.Module
    tokenizer: Any
    fed: list[tuple[list[int], str]]
    device: str
    dtype: str
    clusters: list[int] | None = None      # each fed sample's k-means cluster (sample_info["clusters"])

    @property
    def ids(self) -> list[list[int]]:
        return [x for x, _ in self.fed]


def _load_base_and_select(base_src: ModelSource, texts: list[str], o: AnalysisOptions, torch_dtype,
                          report: Progress, progress: Progress | None) -> _Fed:
    """Load the base, pick the calibration samples (k-means on its embeddings) and encode them."""
    dev_name = "cpu"
    try:
        report(0.02, "loading the base model")
        model, tokenizer = load_causal_lm(base_src, device=o.device, dtype=torch_dtype)
        dev_name = str(input_device(model))
        model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        check_finite_weights(model, "base model", base_src.spec)
        report(0.05, "selecting calibration samples")
        sel_progress = (lambda f, m: report(0.05 + 0.05 * f, m)) if progress else None
        selected, labels = select_samples(texts, model, tokenizer, clusters=o.clusters, fraction=o.fraction,
                                          samples=o.samples, max_tokens=o.max_tokens, seed=o.seed,
                                          batch_size=max(o.batch_size, 8), progress=sel_progress, with_clusters=True)
    except ACMError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom_advice("loading models / selecting samples", dev_name, o.batch_size, o.max_tokens,
                              len(texts)) from None
        raise
    encoded = encode(selected, tokenizer, max_tokens=o.max_tokens, chat_template=o.chat_template)
    fed = [(list(x), text) for x, text in zip(encoded, selected) if x]
    if not fed:
        raise InputError("every calibration text encoded to zero tokens")
    clusters = [int(c) for x, c in zip(encoded, labels) if x]
    return _Fed(model, tokenizer, fed, dev_name, model_dtype, clusters)


@dataclass
class _Estimators:
    """Everything the passes feed: the per-group capture and its estimators, the per-sample capture."""

    names: list[str]
    nmi: list[StreamingMI]
    row_keys: list[str]
    rows: list[dict[str, Any]]
    groups: GroupCapture
    sample_key: str | None
    samples: SampleCapture | None
    head_ids: torch.Tensor
    points: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))


def _make_estimators(o: AnalysisOptions, keys: list[str], sample_key: str | None, base_src: ModelSource,
                     ft_srcs: list[ModelSource], fed: _Fed, batches) -> _Estimators:
    names = group_names(base_src.num_layers)
    k = len(names)
    nmi = [StreamingMI(k, bins=o.bins, seed=o.seed) for _ in ft_srcs] if "nmi" in keys else []
    row_keys = [m for m in keys if METRICS[m].pairs == "rows"]
    rows = [{m: METRICS[m].make(k, sketch_dim=o.sketch_dim, seed=o.seed, bins=o.bins) for m in row_keys}
            for _ in ft_srcs] if row_keys else []
    groups = GroupCapture(k, o.bins, nmi, o.seed, pair_budget=o.pair_budget,
                          batch_tokens=[int(m.sum()) for _, m in batches], row_estimators=rows,
                          row_budget=o.row_budget)
    vocabs = [int(s.vocab_size) for s in [base_src] + ft_srcs if s.vocab_size]
    vocab = min(vocabs) if vocabs else None   # ids valid for every model (vocabularies may differ)
    points = point_names(base_src.num_layers)
    samples = None
    if sample_key is not None:
        est = make_estimator(sample_key, len(points[0]), len(fed.fed), len(ft_srcs), bins=o.bins,
                             max_values=o.sample_max_values, seed=o.seed)
        samples = SampleCapture(est, vocab=vocab)
    out_emb = fed.model.get_output_embeddings()
    weight = getattr(out_emb, "weight", None)
    widths = [v for v in (vocab, int(weight.shape[0]) if weight is not None else None) if v]
    ids = head_ids(min(widths) if widths else len(fed.tokenizer), o.seed)
    del out_emb, weight          # no reference to the base's tensors may outlive its pass
    return _Estimators(names, nmi, row_keys, rows, groups, sample_key, samples, ids, points)


def _run_pass(model: torch.nn.Module, capture: GroupCapture, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
              head_ids: torch.Tensor, padding_side: str, step: Callable[[], None],
              samples: SampleCapture | None = None) -> None:
    """All calibration batches through one model with the capture hooks on (and the per-sample MI
    points' hooks, when ``samples`` is given)."""
    handles = attach_groups(model, capture) if capture.active() else []
    points = attach_points(model, samples) if samples is not None else None
    dev = input_device(model)
    head_on: dict[torch.device, torch.Tensor] = {}
    first = 0
    try:
        with torch.inference_mode():
            for b, (inp, mask) in enumerate(batches):
                if samples is not None:
                    samples.begin_batch(first, mask)
                    first += int(mask.shape[0])
                flat_mask = mask.reshape(-1).bool()
                token_index = None if bool(flat_mask.all()) else flat_mask.nonzero().squeeze(1)
                capture.batch = b
                capture.n_real = int(flat_mask.sum())
                capture.token_index = None if token_index is None else token_index.to(dev)
                kwargs: dict[str, Any] = dict(input_ids=inp.to(dev), attention_mask=mask.to(dev), use_cache=False)
                if padding_side == "left":
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(dev)
                logits = model(**kwargs).logits
                if capture.active():
                    if logits.device not in head_on:
                        head_on[logits.device] = head_ids.to(logits.device)
                    capture.observe_head(capture.num_groups - 1, logits, head_on[logits.device])
                del logits
                step()
    finally:
        for h in handles:
            h.remove()
        if points is not None:
            points.remove()
        capture.token_index = None


def _passes(fed: _Fed, base_src: ModelSource, ft_srcs: list[ModelSource], est: _Estimators, batches,
            o: AnalysisOptions, torch_dtype, report: Progress, bar) -> tuple[list[dict], int]:
    """Base pass (keep what pairing needs), then each fine-tuned model's pass; one model resident at a time.
    Returns (per-pass timings, bytes the base pass stored)."""
    total = len(batches) * (1 + len(ft_srcs))
    done = [0]

    def step() -> None:
        done[0] += 1
        bar.update(1)
        b = (done[0] - 1) % len(batches) + 1
        who = "base" if done[0] <= len(batches) else f"fine-tuned {(done[0] - 1) // len(batches)}/{len(ft_srcs)}"
        report(0.1 + 0.9 * done[0] / total, f"{who}: batch {b}/{len(batches)}")

    def one_pass(model, spec: str, mode: str | int) -> dict:
        t0 = time.perf_counter()
        est.groups.mode, est.groups.ft = ("base", 0) if mode == "base" else ("ft", mode)
        if est.samples is not None:
            est.samples.mode = mode
        _run_pass(model, est.groups, batches, head_ids=est.head_ids, padding_side=o.padding_side, step=step,
                  samples=est.samples)
        return {"model": spec, "seconds": round(time.perf_counter() - t0, 3)}

    model: torch.nn.Module | None = fed.model
    fed.model = None
    try:
        passes = [one_pass(model, base_src.spec, "base")]
        stored = est.groups.stored_bytes() + (est.samples.est.state_bytes() if est.samples is not None else 0)
        weight, model = weight_ref(model), None
        release_memory(weight)
        for i, src in enumerate(ft_srcs):
            report(0.1 + 0.9 * done[0] / total, f"loading fine-tuned model {i + 1}/{len(ft_srcs)}")
            model, _ = load_causal_lm(src, device=o.device, dtype=torch_dtype)
            check_finite_weights(model, "fine-tuned model", src.spec)
            passes.append(one_pass(model, src.spec, i))
            weight, model = weight_ref(model), None
            release_memory(weight)
    except ACMError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom_advice("running the analysis", fed.device, o.batch_size, o.max_tokens, len(fed.fed)) from None
        raise
    finally:
        model = None
        est.groups.clear()
        if est.samples is not None:
            est.samples.est.clear()
    return passes, stored


def _results(ft_srcs: list[ModelSource], est: _Estimators) -> list[ModelNMI]:
    """Each fine-tuned model's values; a group or point that captured nothing fails in one line."""
    out = []
    for i, src in enumerate(ft_srcs):
        values: dict[str, np.ndarray] = {}
        stats: list[tuple[float, float, float]] = []
        if est.nmi:
            stats = est.nmi[i].stats()
            values["nmi"] = est.nmi[i].nmi()
        for key in est.row_keys:
            values[key] = est.rows[i][key].similarity()
        per_sample = est.samples.est.mi(i) if est.samples is not None else np.zeros((0, 0))
        if not np.all(np.isfinite(per_sample)):
            raise ACMError(f"no activations were captured at some per-sample MI point of {src.spec}")
        for key, vals in values.items():
            if not np.all(np.isfinite(vals)):
                missing = [est.names[g] for g in range(len(est.names)) if not math.isfinite(vals[g])]
                raise ACMError(f"no activations were captured for group(s) {', '.join(missing[:3])} of {src.spec} "
                               f"({metric_label(key)})")
        out.append(ModelNMI(model=src.spec, nmi=[float(v) for v in values.get("nmi", [])],
                            mi=[float(s[0]) for s in stats], entropy_base=[float(s[1]) for s in stats],
                            entropy_ft=[float(s[2]) for s in stats],
                            similarity={k: [float(v) for v in values[k]] for k in est.row_keys},
                            sample_mi=[[float(v) for v in row] for row in per_sample]))
    return out


def _method_line(keys: list[str]) -> str:
    if keys == ["nmi"]:
        return "ACM per-group NMI, streaming B×B joint histogram (this project's estimator)"
    if not keys:
        return "per-sample MI only"
    return "ACM per-group similarity: " + "; ".join(f"{METRICS[k].label}: {METRICS[k].formula}" for k in keys)


def _estimator_record(o: AnalysisOptions, est: _Estimators, stored: int) -> dict:
    """The estimators' part of the provenance: ranges, budgets, pairs and memory."""
    g, names = est.groups, est.names
    histogram_bytes = sum(int(j.numel() * j.element_size()) for e in est.nmi for j in e._joint if j is not None)
    metric_state_bytes = sum(int(e.state_bytes()) for per in est.rows for e in per.values())
    return {
        "ranges": {"base": [list(r) if r else None for r in g.base_range],
                   "fine_tuned": [[list(r) if r else None for r in e.y_range] for e in est.nmi]},
        **({"row_metrics": {"sketch_dim": int(o.sketch_dim), "row_budget": int(o.row_budget),
                            "rows_per_group": list(g.rows_per_group),
                            "rows_subsampled": g.rows_subsampled()}} if est.row_keys else {}),
        "pair_budget": int(o.pair_budget),
        "pairs_per_group": [est.nmi[0].count(i) for i in range(len(names))] if est.nmi else [],
        "subsampled_groups": [names[i] for i in range(len(names)) if g.subsampled(i)] if est.nmi else [],
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "cuda_max_allocated_bytes": None,
                   "estimator_bytes": int(histogram_bytes + stored), "histogram_bytes": int(histogram_bytes),
                   "stored_base_bins_bytes": int(stored), "metric_state_bytes": int(metric_state_bytes)},
    }


def _provenance(o: AnalysisOptions, keys: list[str], calibration, texts: list[str], fed: _Fed,
                base_src: ModelSource, ft_srcs: list[ModelSource], compat, est: _Estimators, passes: list[dict],
                stored: int, t_start: float) -> dict:
    ids = fed.ids
    record = _estimator_record(o, est, stored)
    if fed.device.startswith("cuda"):
        record["memory"]["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return {
        "method": _method_line(keys), "metrics": list(keys),
        "models": {"base": base_src.provenance(), "fine_tuned": [s.provenance() for s in ft_srcs]},
        "calibration": {
            "source": describe_source(calibration), "field": o.field, "split": o.split,
            "available": len(texts), "size": len(ids), "samples": len(ids), "tokens": int(sum(map(len, ids))),
            "requested_samples": o.samples, "clusters": o.clusters, "fraction": o.fraction,
            "max_tokens": o.max_tokens,
            "chat_template": bool(o.chat_template and getattr(fed.tokenizer, "chat_template", None)),
        },
        "bins": int(o.bins), "quantiles": list(QUANTILES), "seed": int(o.seed), "max_tokens": int(o.max_tokens),
        "clusters": int(o.clusters), "fraction": float(o.fraction), "batch_size": int(o.batch_size),
        "padding_side": o.padding_side, "head_vocab_subset": len(est.head_ids),
        "ranges": record.pop("ranges"),
        "residency": "one model at a time (base pass, then each fine-tuned model)",
        **record,
        "passes": passes,
        "group_tensors": _group_tensors(base_src, compat.layout),
        "heads": compat.heads,
        "vocab_notes": list(compat.vocab_notes),
        "version": acm.__version__, "device": fed.device, "dtype": fed.dtype,
        "seconds": round(time.perf_counter() - t_start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _sample_info(o: AnalysisOptions, est: _Estimators, clusters: list[int] | None = None) -> dict:
    if est.samples is None:
        return {}
    e = est.samples.est
    info = {"estimator": est.sample_key, "unit": "nats", "points": est.points[0], "point_groups": est.points[1],
            "tokens": list(est.samples.tokens), "max_values": e.max_values,
            "bins": int(o.bins) if est.sample_key == "binned" else None,
            "values_per_point": list(e.values_per_point), "seed": int(o.seed)}
    if clusters is not None and len(clusters) == len(info["tokens"]):
        info["clusters"] = list(clusters)                      # k-means cluster per sample (acm.rules.bands)
    return info


def analyze(base: str | ModelSource, fts: list[str | ModelSource], calibration: str | list[str] | None,
            options: AnalysisOptions | None = None, *, progress: Progress | None = None,
            show_progress: bool = True, **settings: Any) -> AnalysisResult:
    """Per-group similarity (NMI by default) and per-sample MI between the base and each fine-tuned model.

    Order of work (cheap checks first): validate settings → resolve models and check compatibility
    (config + safetensors headers, no weights) → read the calibration texts → load the base →
    k-means sample selection and encoding with the base → base pass (store what pairing needs) →
    unload → for each fine-tuned model: load, pass, unload. One model is resident at a time.
    Out-of-memory becomes ``OutOfMemoryAdvice``. ``calibration=None`` or ``"bundled"`` uses the
    bundled demo set. ``settings`` are ``AnalysisOptions`` fields, overriding ``options``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    o = replace(options or AnalysisOptions(), **settings)
    fts = list(fts) if isinstance(fts, (list, tuple)) else [fts]
    if not fts:
        raise InputError("give at least one fine-tuned model")
    keys, sample_key, torch_dtype = o.validate()
    report = _reporter(progress)
    report(0.0, "checking models")
    base_src, ft_srcs = _source(base, o), [_source(f, o) for f in fts]
    compat = check_compatibility(base_src, ft_srcs)
    texts = load_texts(calibration, field=o.field, split=o.split)
    fetch_all([base_src, *ft_srcs], progress, show_progress=show_progress)   # Hub weights: disk check, download
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fed = _load_base_and_select(base_src, texts, o, torch_dtype, report, progress)
    batches = list(pad_batches(fed.ids, o.batch_size, pad_token_id(fed.tokenizer), o.padding_side))
    est = _make_estimators(o, keys, sample_key, base_src, ft_srcs, fed, batches)
    bar = tqdm(total=len(batches) * (1 + len(ft_srcs)), desc="acm analyze", unit="batch",
               disable=not show_progress or progress is not None)
    try:
        passes, stored = _passes(fed, base_src, ft_srcs, est, batches, o, torch_dtype, report, bar)
    finally:
        bar.close()
    results = _results(ft_srcs, est)
    provenance = _provenance(o, keys, calibration, texts, fed, base_src, ft_srcs, compat, est, passes, stored, t_start)
    report(1.0, "analysis done")
    return AnalysisResult(groups=est.names, models=results, provenance=provenance, sample_info=_sample_info(o, est, fed.clusters),
                          calibration=fed.fed)


def _group_tensors(src: ModelSource, layout=None) -> dict[str, list[str]]:
    """Tensor names of the embed and head groups in the merged model (for exports such as mergekit
    filters): a separate head counts as ``head`` even when the base itself is tied (``acm.checkpoints.heads``)."""
    try:
        names = layout.output_names(src.reader.keys()) if layout is not None else src.reader.keys()
        floats = [k for k in names if k not in src.reader or src.reader.dtype(k).is_floating_point]
        mapping = build_group_map(src.config, [k for k in floats if k in src.reader],
                                  trust_remote_code=src.trust_remote_code)
        if layout is not None and layout.merged_untied:
            mapping[layout.head_key] = HEAD
    except Exception:  # noqa: BLE001 - informative only; never fail an analysis over it
        return {}
    return {EMBED: sorted(k for k, g in mapping.items() if g == EMBED),
            HEAD: sorted(k for k, g in mapping.items() if g == HEAD)}


def summarize(result: AnalysisResult) -> str:
    """A few human lines: per model and metric, the mean and the most / least changed groups."""
    lines = []
    for m in result.models:
        for key in m.metrics():
            vals = np.asarray(m.values(key))
            lo, hi = int(np.argmin(vals)), int(np.argmax(vals))
            name = metric_label(key) if key != "nmi" else "NMI"
            lines.append(f"{m.model}: mean {name} {vals.mean():.3f}; most changed {result.groups[lo]} "
                         f"({vals[lo]:.3f}), least changed {result.groups[hi]} ({vals[hi]:.3f})")
        if m.sample_mi:
            mi = np.asarray(m.sample_mi).mean(axis=1)
            points = result.sample_info.get("points") or []
            lo = int(np.argmin(mi))
            lines.append(f"{m.model}: per-sample MI ({result.sample_info.get('estimator')}) mean {mi.mean():.3f} nats "
                         f"over {len(m.sample_mi[0])} samples; lowest at {points[lo] if points else lo} ({mi[lo]:.3f})")
    return "\n".join(lines)


__all__ = ["AnalysisOptions", "AnalysisResult", "ModelNMI", "analyze", "summarize"]
