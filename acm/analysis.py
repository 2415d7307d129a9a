"""Activation analysis: per-layer-group NMI between the base and each fine-tuned model.

Why it is built this way: ACM needs, for every layer group, how much information the fine-tuned
model's activations still share with the base's on the same calibration tokens, and real pairs
(2 × 15 GB for 7B models in bf16) do not fit one device together. So **one model is resident at
a time**: the base is loaded, selects and encodes the calibration samples (its tokenizer and
chat template), and runs over every batch with forward hooks that bin its activations and keep
only the bin indices (uint8 for B ≤ 256, else int16, on the CPU); it is then released (``gc``,
``torch.cuda.empty_cache``) and each fine-tuned model in turn is loaded, run over the same
batches, binned with its own ranges and paired with the stored base bins in a B×B joint histogram
(``acm.mi.StreamingMI``). Ranges are set exactly as before (robust quantiles of the first batch,
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
offload, ``acm.models.load_causal_lm``); the hooks work unchanged on the offloaded modules.

Groups (see ``acm.grouping``): ``embed`` → output of the input embedding; ``block.k`` → output
hidden states of block k (``output[0]`` when a tuple); ``head`` → logits restricted to a fixed
seeded random subset of at most 4,096 vocabulary ids. Padding positions are excluded.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import acm
from acm.calibration import (
    check_max_tokens,
    check_sampling,
    describe_source,
    encode,
    load_texts,
    select_samples,
)
from acm.errors import ACMError, InputError, OutOfMemoryAdvice, is_out_of_memory
from acm.grouping import EMBED, HEAD, build_group_map, find_group_modules, group_names
from acm.merge_methods import finite
from acm.mi import QUANTILES, StreamingMI, bin_indices, check_bins, robust_range
from acm.models import ModelSource, check_compatibility, load_causal_lm, parse_dtype, resolve_model
from acm.sample_mi import DEFAULT_MAX_VALUES, SampleCapture, attach_points, check_estimator, make_estimator, point_names
from acm.similarity import DEFAULT_SKETCH_DIM, METRICS, metric_label, parse_metrics

FORMAT = "acm-analysis"
FORMAT_VERSION = 1
HEAD_VOCAB_SUBSET = 4096


# ===================================================================================== result


@dataclass
class ModelNMI:
    """One fine-tuned model's per-group statistics (lists in network order)."""

    model: str
    nmi: list[float]
    mi: list[float]
    entropy_base: list[float] = field(default_factory=list)
    entropy_ft: list[float] = field(default_factory=list)
    similarity: dict[str, list[float]] = field(default_factory=dict)   # other metrics: {"cka": [...], ...}
    sample_mi: list[list[float]] = field(default_factory=list)          # [points][samples] nats (acm.sample_mi)

    def has_values(self) -> bool:
        return bool(self.metrics() or self.sample_mi)

    def metrics(self) -> list[str]:
        """Metric keys this model has values for (``nmi`` first when present)."""
        return (["nmi"] if self.nmi else []) + [k for k in self.similarity if k != "nmi"]

    def values(self, metric: str) -> list[float]:
        """Per-group similarity of ``metric`` (InputError, one line, when it was not computed)."""
        vals = self.nmi if metric == "nmi" else self.similarity.get(metric)
        if not vals:
            have = ", ".join(self.metrics()) or "none"
            raise InputError(f"this analysis has no {metric!r} values (it holds: {have}); choose one of those "
                             f"or analyse again with --metric {metric}")
        return vals

    def to_dict(self) -> dict:
        d = {"model": self.model, "nmi": list(self.nmi), "mi": list(self.mi),
             "entropy_base": list(self.entropy_base), "entropy_ft": list(self.entropy_ft)}
        if self.similarity:     # absent in NMI-only analyses: the file is byte-for-byte the old format
            d["similarity"] = {k: list(v) for k, v in self.similarity.items()}
        if self.sample_mi:
            d["sample_mi"] = [[float(x) for x in row] for row in self.sample_mi]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelNMI:
        nmi = [float(x) for x in d.get("nmi") or []]
        sim = d.get("similarity") or {}
        if not isinstance(sim, dict):
            raise TypeError("'similarity' must be an object of per-metric lists")
        return cls(model=str(d["model"]), nmi=nmi,
                   mi=[float(x) for x in d.get("mi") or [math.nan] * len(nmi)],
                   entropy_base=[float(x) for x in d.get("entropy_base", [])],
                   entropy_ft=[float(x) for x in d.get("entropy_ft", [])],
                   similarity={str(k): [float(x) for x in v] for k, v in sim.items() if str(k) != "nmi"},
                   sample_mi=[[float(x) for x in row] for row in d.get("sample_mi") or []])


@dataclass
class AnalysisResult:
    """NMI per (fine-tuned model, layer group) plus everything needed to reproduce it."""

    groups: list[str]
    models: list[ModelNMI]
    provenance: dict = field(default_factory=dict)
    # Per-sample MI (acm.sample_mi): {"estimator", "points", "point_groups", "tokens", "max_values", "bins",
    # "values_per_point"}; empty for analyses made before the paper's rule (they still load).
    sample_info: dict = field(default_factory=dict)
    # The exact token ids and texts fed to the models (not serialised: ``save_calibration`` writes them).
    calibration: list[tuple[list[int], str]] | None = field(default=None, repr=False, compare=False)

    def has_sample_mi(self) -> bool:
        """Whether every model carries per-sample MI (the paper's rule needs it)."""
        return bool(self.sample_info) and all(m.sample_mi for m in self.models)

    def sample_mi_matrix(self) -> np.ndarray:
        """[n_models, points, samples] per-sample MI in nats (InputError, one line, when the file lacks it)."""
        if not self.has_sample_mi():
            raise InputError("this analysis has no per-sample MI (it was made before the paper's rule or with "
                             "--mi-estimator off); run `acm analyze` again to use the acm rule, or use --rule softmax")
        return np.array([m.sample_mi for m in self.models], dtype=np.float64)

    def save_calibration(self, path: str | os.PathLike) -> Path:
        """The exact token sequences the models were fed: JSON lines ``{"input_ids": [...], "text": ...}``."""
        if self.calibration is None:
            raise InputError("this analysis object carries no calibration tokens (only a fresh analysis does)")
        lines = [json.dumps({"input_ids": [int(i) for i in ids], "text": text}, ensure_ascii=False)
                 for ids, text in self.calibration]
        return _atomic_write(path, "\n".join(lines) + "\n")

    def nmi_matrix(self) -> np.ndarray:
        """[n_models, n_groups] NMI."""
        return self.similarity_matrix("nmi")

    def metrics(self) -> list[str]:
        """Similarity metrics every model has values for, in a stable order (``nmi`` first)."""
        first = self.models[0].metrics() if self.models else []
        return [k for k in first if all(k in m.metrics() for m in self.models)]

    def similarity_matrix(self, metric: str = "nmi") -> np.ndarray:
        """[n_models, n_groups] similarity in [0, 1] of ``metric`` (``acm.similarity.METRICS``)."""
        return np.array([m.values(metric) for m in self.models],
                        dtype=np.float64).reshape(len(self.models), len(self.groups))

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "groups": list(self.groups),
             "models": [m.to_dict() for m in self.models], "provenance": self.provenance}
        if self.sample_info:
            d["sample_mi"] = self.sample_info
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AnalysisResult:
        """Parse and validate (InputError, one line, when it is not an analysis)."""
        if not isinstance(d, dict) or "groups" not in d or "models" not in d:
            raise InputError("not an ACM analysis: expected an object with 'groups' and 'models'")
        if d.get("format", FORMAT) != FORMAT:
            raise InputError(f"not an ACM analysis (format {d.get('format')!r})")
        try:
            groups = [str(g) for g in d["groups"]]
            models = [ModelNMI.from_dict(m) for m in d["models"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed ACM analysis ({type(exc).__name__}: {exc})") from None
        if not groups or not models:
            raise InputError("ACM analysis holds no groups or no models")
        info = d.get("sample_mi") or {}
        if not isinstance(info, dict):
            raise InputError("malformed ACM analysis ('sample_mi' must be an object)")
        for m in models:
            if not m.has_values():
                raise InputError(f"ACM analysis: model {m.model} has no similarity values (no NMI, no other metric)")
            if m.sample_mi:
                _check_sample_mi(m, info)
            for key in m.metrics():
                vals, name = m.values(key), "NMI" if key == "nmi" else key
                if len(vals) != len(groups):
                    raise InputError(f"ACM analysis: model {m.model} has {len(vals)} {name} values for "
                                     f"{len(groups)} groups")
                bad = [g for g, v in zip(groups, vals) if not (math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9)]
                if bad:
                    raise InputError(f"ACM analysis: model {m.model} has an invalid {name} for group {bad[0]}")
        return cls(groups=groups, models=models, provenance=dict(d.get("provenance") or {}), sample_info=dict(info))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> AnalysisResult:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"analysis file is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder + ``os.replace``); overwriting is fine."""
        return _atomic_write(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnalysisResult:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"analysis file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read analysis file {path.name} ({exc})") from None
        if not text.strip():
            raise InputError(f"analysis file {path.name} is empty")
        return cls.from_json(text)


def _check_sample_mi(m: ModelNMI, info: dict) -> None:
    points, samples = len(info.get("points") or []), len(info.get("tokens") or [])
    if len(m.sample_mi) != points or any(len(row) != samples for row in m.sample_mi):
        raise InputError(f"ACM analysis: model {m.model} has per-sample MI of the wrong shape "
                         f"(expected {points} points × {samples} samples)")
    if not all(math.isfinite(x) and x >= -1e-9 for row in m.sample_mi for x in row):
        raise InputError(f"ACM analysis: model {m.model} has a non-finite or negative per-sample MI")


def _atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temp file in the same folder + ``os.replace``); overwriting is fine."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write {path}: folder {folder} is not writable ({exc.strerror or exc}); "
                         "choose another --out") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ===================================================================================== capture


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


def _hidden(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise ACMError(f"cannot read a hidden-state tensor from a block output of type {type(output).__name__}")


DEFAULT_PAIR_BUDGET = 1 << 22   # paired values kept per layer group (≈ 4.2 M; 4 MiB of uint8 base bins)
# Row metrics (CKA, cosine): tokens paired per group. Stored: ≤ 8192 × sketch_dim (128) float32 = 4 MiB per
# group and metric; beyond it a seeded subset of tokens (the same for every group and pass).
DEFAULT_ROW_BUDGET = 1 << 13


def check_pair_budget(pair_budget: int, name: str = "pair_budget") -> int:
    """The per-group budget of paired values must be a positive integer (one line otherwise)."""
    if isinstance(pair_budget, bool) or not isinstance(pair_budget, (int, np.integer)) or pair_budget < 1:
        raise InputError(f"{name} must be an integer >= 1, got {pair_budget!r}")
    return int(pair_budget)


def _position_seed(seed: int, group: int, batch: int) -> int:
    """A well-mixed 63-bit seed per (seed, group, batch): the base pass and every fine-tuned pass
    draw the same positions because they derive the same generator."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, group, batch]).generate_state(2, np.uint64)[0]
               & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


class _Capture:
    """Forward hooks that bin activations on the fly, one model at a time.

    Mode ``base`` (the first pass, base model only): fix the base's ranges on the first batch,
    bin its values and *store* the bin indices (uint8 when B ≤ 256, else int16, on the CPU) per
    group and batch. Mode ``ft`` (one pass per fine-tuned model): bin that model's values with its
    own ranges and add (stored base bin, ft bin) pairs into its estimator.

    Which values are paired: every (real token, feature) position of a group while the whole
    calibration set has at most ``pair_budget`` of them (then the histogram is exactly the one
    the all-models-at-once analysis built); beyond that, a seeded uniform draw (with replacement)
    of ``pair_budget`` positions, split over batches in proportion to their real tokens. The draw
    depends only on (seed, group, batch, token counts, feature count), so the base pass and each
    fine-tuned pass take the same positions and the pairs line up.
    """

    def __init__(self, num_groups: int, bins: int, estimators: list[StreamingMI], seed: int, *,
                 pair_budget: int = DEFAULT_PAIR_BUDGET, batch_tokens: list[int] | None = None,
                 row_estimators: list[dict[str, Any]] | None = None, row_budget: int = DEFAULT_ROW_BUDGET):
        self.num_groups = num_groups
        self.bins = bins
        self.estimators = estimators                    # NMI, one per fine-tuned model ([] = NMI not asked for)
        self.row_estimators = [dict(r) for r in (row_estimators or [])]   # per fine-tuned model: {metric: est}
        self.row_budget = int(row_budget)
        self.row_store: dict[str, list[dict[int, torch.Tensor]]] = {
            k: [{} for _ in range(num_groups)] for k in (self.row_estimators[0] if self.row_estimators else {})}
        self.rows_per_group = [0] * num_groups
        self.seed = seed
        self.pair_budget = int(pair_budget)
        self.batch_tokens = list(batch_tokens or [])
        self.total_tokens = sum(self.batch_tokens)
        self.store_dtype = torch.uint8 if bins <= 256 else torch.int16
        self.base_range: list[tuple[float, float] | None] = [None] * num_groups
        self.stored: list[dict[int, torch.Tensor]] = [{} for _ in range(num_groups)]
        self.features: list[int | None] = [None] * num_groups     # values per token, seen in the base pass
        self.token_index: torch.Tensor | None = None    # flat indices of real tokens, None = all
        self.n_real = 0                                 # real tokens in the current batch
        self.batch = 0
        self.mode = "base"
        self.ft = 0

    # -- bookkeeping -----------------------------------------------------------------------
    def active(self) -> bool:
        """Whether any per-group metric is asked for (an analysis may hold per-sample MI only)."""
        return bool(self.estimators or self.row_estimators)

    def subsampled(self, group: int) -> bool:
        feats = self.features[group]
        return feats is not None and self.total_tokens * feats > self.pair_budget

    def stored_bytes(self) -> int:
        per_metric = [t for store in self.row_store.values() for per in store for t in per.values()]
        return sum(t.numel() * t.element_size() for per in self.stored for t in per.values()) + sum(
            t.numel() * t.element_size() for t in per_metric)

    def clear(self) -> None:
        self.stored = [{} for _ in range(self.num_groups)]
        self.row_store = {k: [{} for _ in range(self.num_groups)] for k in self.row_store}

    # -- row metrics (CKA, cosine, …: acm.similarity) ------------------------------------------
    def rows_subsampled(self) -> bool:
        return self.total_tokens > self.row_budget

    def _row_take(self, device: torch.device) -> torch.Tensor | None:
        """Which of the batch's real tokens the row metrics pair: all while the calibration set has at
        most ``row_budget`` tokens, else a seeded draw without replacement, in proportion to the
        batch's tokens — the same tokens in every pass and for every group."""
        if not self.rows_subsampled():
            return None
        tokens = self.batch_tokens[self.batch] if self.batch < len(self.batch_tokens) else self.n_real
        quota = min(self.n_real, max(1, round(self.row_budget * tokens / max(1, self.total_tokens))))
        gen = torch.Generator(device="cpu").manual_seed(_position_seed(self.seed, 1 << 20, self.batch))
        return torch.randperm(self.n_real, generator=gen)[:quota].sort().values.to(device)

    def observe_rows(self, group: int, real_rows: torch.Tensor) -> None:
        """Real-token rows ``[n_real, width]`` of one group: base pass → each metric's ``base_rows``
        (stored on the CPU, bounded width); fine-tuned pass → ``update_stored`` with them."""
        if not self.row_estimators:
            return
        take = self._row_take(real_rows.device)
        rows = real_rows if take is None else real_rows.index_select(0, take)
        if self.mode == "base":
            self.rows_per_group[group] += int(rows.shape[0])
            for key in self.row_store:
                kept = None
                for per_ft in self.row_estimators:       # base-only statistics for every fine-tuned model
                    out = per_ft[key].base_rows(group, rows)
                    kept = out if kept is None else kept
                # a copy: never a view that keeps (or shares) the model's activation buffer
                self.row_store[key][group][self.batch] = kept.to("cpu", copy=True)
            return
        for key, est in self.row_estimators[self.ft].items():
            stored = self.row_store[key][group].get(self.batch)
            if stored is None or stored.shape[0] != rows.shape[0]:
                raise ACMError(f"group {group}, batch {self.batch}: the base pass stored "
                               f"{0 if stored is None else stored.shape[0]} rows for {key}, the fine-tuned "
                               f"pass gave {rows.shape[0]}")
            est.update_stored(group, stored.to(rows.device, non_blocking=True), rows)

    def _needs_range(self, group: int) -> bool:
        if self.mode == "base":
            return self.base_range[group] is None
        return self.estimators[self.ft].y_range[group] is None

    def _quota(self, group: int, features: int) -> int | None:
        """Pairs to draw from this batch for this group; ``None`` = every real position."""
        if self.mode == "base":
            self.features[group] = features
        elif self.features[group] != features:
            raise ACMError(f"group {group}: the fine-tuned model gives {features} values per token, "
                           f"the base {self.features[group]}")
        if not self.subsampled(group):
            return None
        tokens = self.batch_tokens[self.batch] if self.batch < len(self.batch_tokens) else self.n_real
        return max(1, round(self.pair_budget * tokens / max(1, self.total_tokens)))

    def _positions(self, group: int, features: int, quota: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of ``quota`` seeded uniform draws among the batch's real positions."""
        gen = torch.Generator(device="cpu").manual_seed(_position_seed(self.seed, group, self.batch))
        flat = torch.randint(0, self.n_real * features, (quota,), generator=gen)
        rows, cols = flat // features, flat % features
        if self.token_index is not None:
            rows = self.token_index.cpu()[rows]
        return rows.to(device), cols.to(device)

    def select(self, act: torch.Tensor) -> torch.Tensor:
        flat = act.reshape(-1, act.shape[-1])
        if self.token_index is not None:
            idx = self.token_index if self.token_index.device == flat.device else self.token_index.to(flat.device)
            flat = flat.index_select(0, idx)
        return flat

    # -- hooks -----------------------------------------------------------------------------
    def observe(self, group: int, act: torch.Tensor) -> None:
        """Token-major activations [..., features]: pad rows never enter the histogram."""
        act = act.detach()
        if self.row_estimators:
            self.observe_rows(group, self.select(act))
        if not self.estimators:
            return
        features = act.shape[-1]
        quota = self._quota(group, features)
        if quota is None:
            values = self.select(act)
            self._bin(group, values, values, owned=values is not act and values.data_ptr() != act.data_ptr())
            return
        rows, cols = self._positions(group, features, quota, act.device)
        values = act.reshape(-1, features)[rows, cols]
        range_values = self.select(act) if self._needs_range(group) else values   # first batch: as before
        self._bin(group, values, range_values, owned=True)

    def observe_head(self, group: int, logits: torch.Tensor, head_ids: torch.Tensor) -> None:
        """Logits restricted to ``head_ids``. All positions: gathered as [ids, real tokens] (rows of
        the transposed view, a fast contiguous copy); a subsample gathers its draws directly."""
        flat = logits.detach().reshape(-1, logits.shape[-1])
        if self.row_estimators:
            self.observe_rows(group, self.select(flat.index_select(1, head_ids)))
        if not self.estimators:
            return
        k = int(head_ids.numel())
        quota = self._quota(group, k)
        sub = None
        if quota is None or self._needs_range(group):
            sub = flat.t().index_select(0, head_ids)                  # [k, n_positions], contiguous
            if self.token_index is not None:
                idx = self.token_index if self.token_index.device == sub.device else self.token_index.to(sub.device)
                sub = sub.index_select(1, idx)
        if quota is None:
            self._bin(group, sub, sub, owned=True)
            return
        rows, cols = self._positions(group, k, quota, flat.device)
        values = flat[rows, head_ids[cols]]
        self._bin(group, values, sub if sub is not None else values, owned=True)

    def _bin(self, group: int, values: torch.Tensor, range_values: torch.Tensor, owned: bool = False) -> None:
        """Bin one group's values; ``owned`` = ``values`` is our own copy and may be overwritten."""
        if self.mode == "base":
            if self.base_range[group] is None:
                self.base_range[group] = robust_range(range_values, QUANTILES, seed=self.seed + group)
                for est in self.estimators:
                    est.set_range(group, x_range=self.base_range[group])
            ix = bin_indices(values, *self.base_range[group], self.bins, inplace=owned)
            self.stored[group][self.batch] = ix.to(self.store_dtype).cpu()
        else:
            est = self.estimators[self.ft]
            if est.y_range[group] is None:
                # same seed as the base: the subsample (when values are many) takes the same positions,
                # so a fine-tuned model identical to the base gets identical ranges (NMI exactly 1)
                est.set_range(group, y_range=robust_range(range_values, QUANTILES, seed=self.seed + group))
            iy = bin_indices(values, *est.y_range[group], self.bins, inplace=owned)
            ix = self.stored[group].get(self.batch)
            if ix is None or ix.numel() != iy.numel():
                raise ACMError(f"group {group}, batch {self.batch}: the base pass stored "
                               f"{0 if ix is None else ix.numel()} values, the fine-tuned pass gave {iy.numel()}")
            est.add_indices(group, ix.to(iy.device, non_blocking=True), iy)

    def hook(self, group: int):
        def fn(_module, _inputs, output):
            self.observe(group, _hidden(output))
        return fn


def _register(model: torch.nn.Module, capture: _Capture) -> list:
    mods = find_group_modules(model)
    handles = [mods.embed.register_forward_hook(capture.hook(0))]
    for k, block in enumerate(mods.blocks):
        handles.append(block.register_forward_hook(capture.hook(k + 1)))
    return handles


def _batches(ids: list[list[int]], batch_size: int, pad_id: int, padding_side: str = "right"):
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, x in enumerate(chunk):
            if padding_side == "left":
                inp[j, width - len(x):] = torch.tensor(x, dtype=torch.long)
                mask[j, width - len(x):] = 1
            else:
                inp[j, :len(x)] = torch.tensor(x, dtype=torch.long)
                mask[j, :len(x)] = 1
        yield inp, mask


def _input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device if emb is not None and getattr(emb, "weight", None) is not None else model.device


def _head_ids(vocab: int, seed: int) -> torch.Tensor:
    if vocab <= HEAD_VOCAB_SUBSET:
        return torch.arange(vocab)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=gen)[:HEAD_VOCAB_SUBSET].sort().values


def _group_tensors(src: ModelSource, layout=None) -> dict[str, list[str]]:
    """Tensor names of the embed and head groups in the merged model (for exports such as mergekit
    filters): a separate head counts as ``head`` even when the base itself is tied (``acm.heads``)."""
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


def _check_args(*, bins, batch_size, max_tokens, clusters, fraction, samples, seed, fts) -> None:
    check_bins(bins)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_max_tokens(max_tokens)
    check_sampling(clusters=clusters, fraction=fraction, samples=samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if not fts:
        raise InputError("give at least one fine-tuned model")


# ===================================================================================== analyze


def _peak_rss_bytes() -> int | None:
    """The process's resident-set high-water mark (Linux/macOS ``ru_maxrss``; psutil elsewhere)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:  # noqa: BLE001 - no resource module (Windows): best effort
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except Exception:  # noqa: BLE001 - peak memory is provenance only; never fail an analysis for it
            return None


def _weight_ref(model: torch.nn.Module) -> weakref.ref | None:
    """A weak reference to one of the model's weights: tells whether dropping the model freed them."""
    try:
        return weakref.ref(next(model.parameters()))
    except (StopIteration, TypeError):
        return None


def _release_memory(weight: weakref.ref | None = None) -> None:
    """After the caller dropped its last reference to a model: collect it now if reference cycles keep
    its weights alive (``weight`` still resolves; a full ``gc.collect`` costs ~0.4 s in a process with
    many objects, most of a small analysis, so it runs only when needed), hand freed heap pages back to
    the OS (glibc keeps freed chunks below its adaptive mmap threshold, up to 32 MB, e.g. attention
    projections) and CUDA's cached blocks, before the next model loads."""
    if weight is None or weight() is not None:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_pass(model: torch.nn.Module, capture: _Capture, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
              head_ids: torch.Tensor, padding_side: str, step: Callable[[], None],
              samples: SampleCapture | None = None) -> None:
    """All calibration batches through one model with the capture hooks on (and the per-sample MI
    points' hooks, when ``samples`` is given)."""
    handles = _register(model, capture) if capture.active() else []
    points = attach_points(model, samples) if samples is not None else None
    dev = _input_device(model)
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


def analyze(base: str | ModelSource, fts: list[str | ModelSource], calibration: str | list[str] | None, *,
            field: str | None = None, split: str = "train", samples: int | None = None, clusters: int = 20,
            fraction: float = 0.1, max_tokens: int = 512, bins: int = 64, batch_size: int = 4, seed: int = 0,
            device: str | None = None, dtype: str | None = None, chat_template: bool = True,
            allow_pickle: bool = False, trust_remote_code: bool = False,
            progress: Callable[[float, str], None] | None = None, show_progress: bool = True,
            padding_side: str = "right", pair_budget: int = DEFAULT_PAIR_BUDGET,
            metrics: str | list[str] | tuple[str, ...] | None = None, sketch_dim: int = DEFAULT_SKETCH_DIM,
            row_budget: int = DEFAULT_ROW_BUDGET, sample_mi: str | None = "labels",
            sample_max_values: int | None = DEFAULT_MAX_VALUES) -> AnalysisResult:
    """Per-group similarity (NMI by default) between the base and each fine-tuned model on calibration text.

    Order of work (cheap checks first): validate settings → resolve models and check
    compatibility (config + safetensors headers, no weights) → read the calibration texts →
    load the base → k-means sample selection and encoding with the base → base pass (store
    base bins) → unload → for each fine-tuned model: load, pass, unload. One model is resident at
    a time. Out-of-memory becomes ``OutOfMemoryAdvice``. ``calibration=None`` or ``"bundled"``
    uses the bundled demo set. ``pair_budget``: paired values per group (see ``_Capture``).
    ``metrics``: keys of ``acm.similarity.METRICS`` (default ``["nmi"]``), all computed in the same
    passes; row metrics pair at most ``row_budget`` tokens per group, projected to ``sketch_dim``;
    ``metrics=[]`` computes none of them (per-sample MI only). ``sample_mi``: the per-sample MI
    estimator at the paper's activation points (``acm.sample_mi``: ``labels`` default, ``binned``, or
    None for none), at most ``sample_max_values`` values per (sample, point) (None: all).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    fts = list(fts) if isinstance(fts, (list, tuple)) else [fts]
    _check_args(bins=bins, batch_size=batch_size, max_tokens=max_tokens, clusters=clusters, fraction=fraction,
                samples=samples, seed=seed, fts=fts)
    pair_budget = check_pair_budget(pair_budget)
    metric_keys = [] if isinstance(metrics, (list, tuple)) and not metrics else parse_metrics(metrics)
    sample_key = None if sample_mi in (None, "", "off", "none") else check_estimator(sample_mi)
    if not metric_keys and sample_key is None:
        raise InputError("nothing to measure: give a similarity metric or a per-sample MI estimator")
    row_budget = check_pair_budget(row_budget, "row_budget")
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, (int, np.integer)) or sketch_dim < 1:
        raise InputError(f"sketch_dim must be an integer >= 1, got {sketch_dim!r}")
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    torch_dtype = parse_dtype(dtype)

    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(float(min(1.0, max(0.0, frac))), msg)

    report(0.0, "checking models")
    base_src = base if isinstance(base, ModelSource) else resolve_model(
        base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    ft_srcs = [f if isinstance(f, ModelSource) else resolve_model(
        f, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code) for f in fts]
    compat = check_compatibility(base_src, ft_srcs)
    texts = load_texts(calibration, field=field, split=split)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    dev_name = "cpu"
    model_dtype = None
    try:
        report(0.02, "loading the base model")
        base_model, tokenizer = load_causal_lm(base_src, device=device, dtype=torch_dtype)
        dev_name = str(_input_device(base_model))
        model_dtype = str(next(base_model.parameters()).dtype).replace("torch.", "")
        check_finite_weights(base_model, "base model", base_src.spec)
        report(0.05, "selecting calibration samples")
        sel_progress = (lambda f, m: report(0.05 + 0.05 * f, m)) if progress else None
        selected = select_samples(texts, base_model, tokenizer, clusters=clusters, fraction=fraction,
                                  samples=samples, max_tokens=max_tokens, seed=seed, batch_size=max(batch_size, 8),
                                  progress=sel_progress)
    except ACMError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom_advice("loading models / selecting samples", dev_name, batch_size, max_tokens,
                              len(texts)) from None
        raise
    encoded = encode(selected, tokenizer, max_tokens=max_tokens, chat_template=chat_template)
    fed = [(list(x), text) for x, text in zip(encoded, selected) if x]
    ids = [x for x, _ in fed]
    if not ids:
        raise InputError("every calibration text encoded to zero tokens")
    n_tokens = sum(len(x) for x in ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = list(_batches(ids, batch_size, pad_id, padding_side))

    names = group_names(base_src.num_layers)
    num_groups = len(names)
    estimators = [StreamingMI(num_groups, bins=bins, seed=seed) for _ in ft_srcs] if "nmi" in metric_keys else []
    row_keys = [k for k in metric_keys if METRICS[k].pairs == "rows"]
    row_estimators = [{k: METRICS[k].make(num_groups, sketch_dim=sketch_dim, seed=seed, bins=bins) for k in row_keys}
                      for _ in ft_srcs] if row_keys else []
    capture = _Capture(num_groups, bins, estimators, seed, pair_budget=pair_budget,
                       batch_tokens=[int(m.sum()) for _, m in batches], row_estimators=row_estimators,
                       row_budget=row_budget)
    point_list, point_groups = point_names(base_src.num_layers)
    samples_est = make_estimator(sample_key, len(point_list), len(ids), len(ft_srcs), bins=bins,
                                 max_values=sample_max_values, seed=seed) if sample_key else None
    vocabs = [int(s.vocab_size) for s in [base_src] + ft_srcs if s.vocab_size]
    vocab = min(vocabs) if vocabs else None   # head ids valid for every model (vocabularies may differ)
    samples_cap = SampleCapture(samples_est, vocab=vocab) if samples_est is not None else None
    out_emb = base_model.get_output_embeddings()
    weight = getattr(out_emb, "weight", None)
    widths = [v for v in (vocab, int(weight.shape[0]) if weight is not None else None) if v]
    head_ids = _head_ids(min(widths) if widths else len(tokenizer), seed)
    del out_emb, weight          # no reference to the base's tensors may outlive its pass
    n_batches = len(batches)
    total_steps = n_batches * (1 + len(ft_srcs))
    done = [0]
    bar = tqdm(total=total_steps, desc="acm analyze", unit="batch", disable=not show_progress or progress is not None)
    stored_peak = 0
    passes: list[dict[str, Any]] = []

    def step() -> None:
        done[0] += 1
        bar.update(1)
        b = (done[0] - 1) % n_batches + 1
        who = "base" if done[0] <= n_batches else f"fine-tuned {(done[0] - 1) // n_batches}/{len(ft_srcs)}"
        report(0.1 + 0.9 * done[0] / total_steps, f"{who}: batch {b}/{n_batches}")

    model: torch.nn.Module | None = base_model
    del base_model
    try:
        t0 = time.perf_counter()
        capture.mode = "base"
        _run_pass(model, capture, batches, head_ids=head_ids, padding_side=padding_side, step=step,
                  samples=samples_cap)
        passes.append({"model": base_src.spec, "seconds": round(time.perf_counter() - t0, 3)})
        stored_peak = capture.stored_bytes() + (samples_est.state_bytes() if samples_est is not None else 0)
        weight, model = _weight_ref(model), None
        _release_memory(weight)
        for i, src in enumerate(ft_srcs):
            report(0.1 + 0.9 * done[0] / total_steps, f"loading fine-tuned model {i + 1}/{len(ft_srcs)}")
            model, _ = load_causal_lm(src, device=device, dtype=torch_dtype)
            check_finite_weights(model, "fine-tuned model", src.spec)
            t0 = time.perf_counter()
            capture.mode, capture.ft = "ft", i
            if samples_cap is not None:
                samples_cap.mode = i
            _run_pass(model, capture, batches, head_ids=head_ids, padding_side=padding_side, step=step,
                      samples=samples_cap)
            passes.append({"model": src.spec, "seconds": round(time.perf_counter() - t0, 3)})
            weight, model = _weight_ref(model), None
            _release_memory(weight)
    except ACMError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _oom_advice("running the analysis", dev_name, batch_size, max_tokens, len(ids)) from None
        raise
    finally:
        bar.close()
        model = None
        capture.clear()
        if samples_est is not None:
            samples_est.clear()

    results = []
    for i, src in enumerate(ft_srcs):
        values: dict[str, np.ndarray] = {}
        stats: list[tuple[float, float, float]] = []
        if estimators:
            stats = estimators[i].stats()
            values["nmi"] = estimators[i].nmi()
        for key in row_keys:
            values[key] = row_estimators[i][key].similarity()
        per_sample = samples_est.mi(i) if samples_est is not None else np.zeros((0, 0))
        if not np.all(np.isfinite(per_sample)):
            raise ACMError(f"no activations were captured at some per-sample MI point of {src.spec}")
        for key, vals in values.items():
            if not np.all(np.isfinite(vals)):
                missing = [names[g] for g in range(num_groups) if not math.isfinite(vals[g])]
                raise ACMError(f"no activations were captured for group(s) {', '.join(missing[:3])} of {src.spec} "
                               f"({metric_label(key)})")
        results.append(ModelNMI(model=src.spec, nmi=[float(v) for v in values.get("nmi", [])],
                                mi=[float(s[0]) for s in stats], entropy_base=[float(s[1]) for s in stats],
                                entropy_ft=[float(s[2]) for s in stats],
                                similarity={k: [float(v) for v in values[k]] for k in row_keys},
                                sample_mi=[[float(v) for v in row] for row in per_sample]))
    seconds = time.perf_counter() - t_start
    histogram_bytes = sum(int(j.numel() * j.element_size()) for est in estimators for j in est._joint if j is not None)
    metric_state_bytes = sum(int(e.state_bytes()) for per in row_estimators for e in per.values())
    cuda_peak = None
    if dev_name.startswith("cuda"):
        cuda_peak = int(torch.cuda.max_memory_allocated())
    provenance = {
        "method": ("ACM per-group NMI, streaming B×B joint histogram (this project's estimator)"
                   if metric_keys == ["nmi"] else "per-sample MI only" if not metric_keys else
                   "ACM per-group similarity: " + "; ".join(f"{METRICS[k].label}: {METRICS[k].formula}"
                                                            for k in metric_keys)),
        "metrics": list(metric_keys),
        "models": {"base": base_src.provenance(), "fine_tuned": [s.provenance() for s in ft_srcs]},
        "calibration": {
            "source": describe_source(calibration), "field": field, "split": split,
            "available": len(texts), "size": len(ids), "samples": len(ids), "tokens": int(n_tokens),
            "requested_samples": samples, "clusters": clusters, "fraction": fraction, "max_tokens": max_tokens,
            "chat_template": bool(chat_template and getattr(tokenizer, "chat_template", None)),
        },
        "bins": int(bins), "quantiles": list(QUANTILES), "seed": int(seed), "max_tokens": int(max_tokens),
        "clusters": int(clusters), "fraction": float(fraction), "batch_size": int(batch_size),
        "padding_side": padding_side,
        "head_vocab_subset": len(head_ids),
        "ranges": {"base": [list(r) if r else None for r in capture.base_range],
                   "fine_tuned": [[list(r) if r else None for r in est.y_range] for est in estimators]},
        "residency": "one model at a time (base pass, then each fine-tuned model)",
        **({"row_metrics": {"sketch_dim": int(sketch_dim), "row_budget": int(row_budget),
                            "rows_per_group": list(capture.rows_per_group),
                            "rows_subsampled": capture.rows_subsampled()}} if row_keys else {}),
        "pair_budget": int(pair_budget),
        "pairs_per_group": [estimators[0].count(g) for g in range(num_groups)] if estimators else [],
        "subsampled_groups": [names[g] for g in range(num_groups) if capture.subsampled(g)] if estimators else [],
        "memory": {"peak_rss_bytes": _peak_rss_bytes(), "cuda_max_allocated_bytes": cuda_peak,
                   "estimator_bytes": int(histogram_bytes + stored_peak), "histogram_bytes": int(histogram_bytes),
                   "stored_base_bins_bytes": int(stored_peak), "metric_state_bytes": int(metric_state_bytes)},
        "passes": passes,
        "group_tensors": _group_tensors(base_src, compat.layout),
        "heads": compat.heads,
        "vocab_notes": list(compat.vocab_notes),
        "version": acm.__version__, "device": dev_name, "dtype": model_dtype,
        "seconds": round(seconds, 3), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sample_info = {}
    if samples_est is not None:
        sample_info = {"estimator": sample_key, "unit": "nats", "points": point_list, "point_groups": point_groups,
                       "tokens": list(samples_cap.tokens), "max_values": samples_est.max_values,
                       "bins": int(bins) if sample_key == "binned" else None,
                       "values_per_point": list(samples_est.values_per_point), "seed": int(seed)}
    report(1.0, "analysis done")
    return AnalysisResult(groups=names, models=results, provenance=provenance, sample_info=sample_info,
                          calibration=fed)


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


__all__ = ["AnalysisResult", "ModelNMI", "analyze", "summarize"]
