"""The streamed, sharded merge engine: every method of ``acm.merging.methods`` (+ its ACM variant).

Why streamed: a merge must work for models far larger than memory. Tensors are read one at a time
from every model (``TensorReader``), merged in float32 on ``options.device`` (CUDA when available),
cast to the output dtype and handed to a ``ShardWriter``; peak memory is a few tensors plus one
output shard. The output folder appears atomically (temp dir renamed on success).

The per-tensor maths lives in ``acm.merging.kernels`` (one module per strategy family); the formulas
(docs/design.md "Merge methods"):

* ``linear``:          θ = Σᵢ wᵢ·θᵢ  (weights normalised to sum 1; default uniform)
* ``task_arithmetic``: θ = θ₀ + Σᵢ λᵢ,ₖ·τᵢ,  τᵢ = θᵢ − θ₀
* ``ties``:            trim τᵢ to its top ``density`` by |τ|, elect signs from Σ λτ, θ = θ₀ + Σ agreeing λτ
* ``dare_ta`` / ``dare_ties``: drop entries of τᵢ with probability p, rescale by 1/(1−p), then TA / TIES
* ``breadcrumbs`` / ``breadcrumbs_ties``: drop the top-``gamma`` |τ| (outliers) and the smallest, keep
  ``density``, then TA / TIES election
* ``della`` / ``della_linear``: per row, keep with probability density ± ε by |τ| rank, rescale by 1/p,
  then TIES election / TA

Which maths a method runs is its ``acm.merging.methods.MethodSpec``'s strategies (``sparsify`` steps and
``combine``), built once per merge (``kernels.MethodKernel``) and called for every tensor: no method names here.

λᵢ,ₖ is the coefficient of fine-tuned model i in layer group k. A plain merge uses λ = α for every
group; an ACM merge passes ``lambdas`` (from ``acm.rules.coefficients.lambdas_by_group``). Both go
through the same code, so ACM with λ = α everywhere is bit-for-bit the plain method.

Vocabulary: rows a fine-tuned model lacks count as τ = 0; rows beyond the base's (added tokens) are
taken from the first fine-tuned model (in the order given) that has them, and reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path

import torch

from acm.checkpoints.compatibility import check_compatibility
from acm.checkpoints.grouping import HEAD
from acm.checkpoints.grouping import NORM_GROUP as NORM_KEY
from acm.checkpoints.heads import HeadLayout
from acm.checkpoints.models import ModelSource, fetch_all, parse_dtype, pick_device, resolve_model
from acm.checkpoints.shards import AtomicFolder, ShardWriter, check_target, parse_size
from acm.checkpoints.templates import (
    check_tokenizer_fits,
    copy_tokenizer_files,
    is_tokenizer_file,
    parse_tokenizer_from,
    template_family,
    tokenizer_facts,
    tokenizer_from_label,
)
from acm.checkpoints.tensors import StreamedTensor, Window
from acm.errors import InputError
from acm.merging import kernels, methods
from acm.sizes import format_bytes

log = logging.getLogger(__name__)

# The registry (acm.merging.methods) is the one list of methods; these names stay importable for older callers.
METHODS = methods.METHODS
TIES_METHODS = methods.methods_using("trim_scope")     # magnitude trim: density + trim scope
DARE_METHODS = methods.methods_using("drop_rate")      # DARE drop: drop rate + seed
TRIM_SCOPES = methods.TRIM_SCOPES

# Files of the base folder that are not copied: weights, their indexes, and what we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot")
_NOT_COPIED = {"config.json", "README.md", "acm_recipe.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json"}


@dataclass
class MergeSettings:
    """What a merge needs besides the method's parameters: the method, where and how the output is written.

    The method's own parameters (α, density, drop rate, …) are not listed here: ``MergeOptions`` takes
    one field per ``acm.merging.methods.OPTIONS`` entry, so a new parameter is declared once, in its
    ``OptionSpec`` (which also gives the CLI flag and the app's control)."""

    method: str = "task_arithmetic"
    dtype: str | None = None             # output dtype; None = the base's
    shard_size: int | str = "2GB"
    device: str | None = None            # None/"auto" = CUDA when available
    threads: int | None = None           # CPU merges: torch threads (None = half the cores, 1..8)
    tokenizer_from: str = "base"         # tokenizer + chat template + generation defaults: base | ft | ft:N

    def validate(self, n_models: int | None = None) -> None:
        """Raise InputError (one line) for an out-of-range option."""
        if self.method not in METHODS:
            methods.check_method(self.method)          # (raises: the one message for an unknown method)
        methods.validate_options(self.method, alpha=self.alpha, density=self.density, drop_rate=self.drop_rate,
                                 gamma=self.gamma, epsilon=self.epsilon, trim_scope=self.trim_scope, seed=self.seed)
        if n_models is not None:
            methods.check_num_fine_tuned(n_models)
        parse_dtype(self.dtype)
        parse_size(self.shard_size)
        if n_models is not None:
            parse_tokenizer_from(self.tokenizer_from, n_models)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads must be a positive integer, got {self.threads!r}")
        if self.weights is not None:
            if not methods.SPECS[self.method].uses("weights"):
                raise InputError("weights apply to --method linear only; task-vector methods use --alpha or ACM λ")
            if n_models is not None and len(self.weights) != n_models:
                raise InputError(f"got {len(self.weights)} weight(s) for {n_models} fine-tuned model(s)")
            if any(not _finite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise InputError(f"weights must be finite, >= 0 and not all zero, got {self.weights}")

    def to_dict(self) -> dict:
        return asdict(self)


MergeOptions = make_dataclass(
    "MergeOptions", [methods.option_field(o) for o in methods.OPTIONS.values()], bases=(MergeSettings,),
    namespace={"__doc__": "Everything that defines a merge besides the models and the per-group λ: the "
                          "``MergeSettings`` plus one field per method parameter (``acm.merging.methods.OPTIONS``).",
               "__module__": __name__})


@dataclass
class MergeReport:
    """What a merge did; shown by the CLI/UI and recorded in the recipe."""

    out_dir: Path
    seconds: float
    bytes_written: int
    num_tensors: int
    num_shards: int
    lambdas: list[dict[str, float]]
    vocab_notes: list[str]
    options: MergeOptions
    recipe: dict = field(default_factory=dict)   # the acm_recipe.json written next to the weights

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "seconds": self.seconds, "bytes_written": self.bytes_written,
                "num_tensors": self.num_tensors, "num_shards": self.num_shards, "lambdas": self.lambdas,
                "vocab_notes": list(self.vocab_notes), "options": self.options.to_dict(), "recipe": self.recipe}


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def merge_models(base: str | ModelSource, fts: list[str | ModelSource], out_dir: str | Path,
                 options: MergeOptions, *, lambdas: list[dict[str, float]] | None = None, acm: dict | None = None,
                 force: bool = False, allow_pickle: bool = False,
                 progress: Callable[[float, str], None] | None = None, show_progress: bool = True) -> MergeReport:
    """Merge ``fts`` into ``base`` and write a complete HF model folder at ``out_dir``.

    ``lambdas`` (one ``{group: λ}`` per fine-tuned model) makes it an ACM merge; ``None`` is the plain
    method with λ = α everywhere. ``acm`` ({"analysis": provenance, "t", "alpha", "clip"}) is recorded
    in the model card and recipe. Nothing appears at ``out_dir`` unless the merge succeeded.
    """
    t0 = time.perf_counter()
    if isinstance(fts, (str, Path, ModelSource)):
        fts = [fts]
    options.validate(len(fts))
    target = Path(out_dir).expanduser().absolute()
    check_target(target, force=force)          # cheap: refuse an existing / unwritable target first
    base_src = base if isinstance(base, ModelSource) else resolve_model(str(base), allow_pickle=allow_pickle)
    ft_srcs = [f if isinstance(f, ModelSource) else resolve_model(str(f), allow_pickle=allow_pickle) for f in fts]
    compat = check_compatibility(base_src, ft_srcs)
    _check_not_an_input(target, [base_src, *ft_srcs])
    device = pick_device(options.device)
    out_dtype = parse_dtype(options.dtype)

    layout = compat.layout
    names = layout.output_names(base_src.reader.keys())
    group_of = _group_map(base_src, names, layout)
    groups = _ordered_groups(base_src, group_of)
    lams = _resolve_lambdas(lambdas, groups, len(ft_srcs), options, base_src.num_layers)
    _check_disk_space(base_src, names, layout, target, out_dtype)
    fetch_all([base_src, *ft_srcs], progress, show_progress=show_progress)   # Hub weights: disk check, download

    plan = _Plan(base_src, ft_srcs, options, device, group_of, lams, layout)
    tok_index = parse_tokenizer_from(options.tokenizer_from, len(ft_srcs))
    tok_src = [base_src, *ft_srcs][tok_index]
    tokenizer_info = _check_tokenizer(tok_src, tok_index, plan.out_vocab_size or _embedding_rows(base_src, layout))
    shard_bytes = parse_size(options.shard_size)
    atomic = AtomicFolder(target, force=force)
    with atomic as tmp, _cpu_threads(options.threads, device):
        bar = _progress_bar(len(names) * (3 if plan.global_trim else 1), show_progress and progress is None)
        writer, num_shards = _write_weights(plan, names, tmp, shard_bytes, out_dtype, progress, bar)
        vocab_notes = list(compat.vocab_notes) + plan.vocab_notes()
        config_dtype = options.dtype and str(out_dtype).replace("torch.", "") or _base_dtype_name(base_src)
        _write_config(base_src, tmp, config_dtype, plan.out_vocab_size, untie=layout.merged_untied,
                      token_ids_from=tok_src if tok_index else None)
        _copy_side_files(base_src, tmp, tok_src)
        from acm import __version__
        from acm.merging.export import build_recipe, model_card

        stats = {"num_tensors": writer.num_tensors, "num_shards": num_shards, "bytes": writer.total_bytes,
                 "dtype": config_dtype, "vocab_size": plan.out_vocab_size or base_src.vocab_size,
                 "device": str(device), "heads": compat.heads, "tokenizer": tokenizer_info}
        recipe = build_recipe(base_src, ft_srcs, options, lams, groups=groups, acm=acm,
                              vocab_notes=vocab_notes, stats=stats, version=__version__,
                              out_name=target.name)
        (tmp / "acm_recipe.json").write_text(json.dumps(recipe, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(recipe), encoding="utf-8")
        if progress is not None:
            progress(0.99, "finalising the output folder")
        final = atomic.commit()
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress(1.0, "done")
    return MergeReport(out_dir=final, seconds=seconds, bytes_written=writer.total_bytes,
                       num_tensors=writer.num_tensors, num_shards=num_shards, lambdas=lams,
                       vocab_notes=vocab_notes, options=options, recipe=recipe)


def _write_weights(plan: _Plan, names: list[str], folder: Path, shard_bytes: int, out_dtype: torch.dtype | None,
                   progress: Callable[[float, str], None] | None, bar) -> tuple[ShardWriter, int]:
    """Merge every tensor into shards in ``folder`` (after the global-trim passes when the plan has them);
    returns the writer and the number of shards. The plan's inputs and the bar are closed either way."""
    writer = None
    try:
        if plan.global_trim:
            plan.global_thresholds(names, progress, bar)
        writer = ShardWriter(folder, shard_bytes, plan=plan.output_plan(names, out_dtype))
        start = 0.5 if plan.global_trim else 0.0
        for i, name in enumerate(names):
            writer.add(name, plan.merge_tensor(name, out_dtype))
            plan.release(name)
            if progress is not None:
                progress(start + (1 - start) * (i + 1) / len(names) * 0.98, f"merging {name}")
            if bar is not None:
                bar.update(1)
        return writer, writer.close()
    finally:
        if writer is not None:
            writer.abort()
        plan.close()
        if bar is not None:
            bar.close()


class _Plan:
    """Per-merge state: the sources, resolved λ, device, global thresholds, vocabulary growth."""

    def __init__(self, base: ModelSource, fts: list[ModelSource], options: MergeOptions, device: torch.device,
                 group_of: dict[str, str], lams: list[dict[str, float]], layout: HeadLayout):
        self.base, self.fts, self.o, self.device = base, fts, options, device
        self.layout = layout
        self.sources = [base, *fts]
        self.group_of, self.lams = group_of, lams
        self.method = options.method
        self.spec = methods.SPECS[options.method]
        self.kernel = kernels.MethodKernel(self.spec, options)      # the spec's strategies, built once
        self.global_trim = (self.spec.uses("trim_scope") and options.trim_scope == "global"
                            and options.density < 1.0)
        self.thresholds: list[float] | None = None
        self._global_ties: dict[str, list[int | None]] = {}
        self._grown: list[str] = []
        self.ws = kernels.Workspace(device)
        self.chunk = kernels.CPU_CHUNK if device.type == "cpu" else kernels.GPU_CHUNK
        # One read window per model (inputs are read with positioned reads, not memory-mapped) and one
        # reused output buffer: no fresh allocation, page fault and zero-fill per merged tensor.
        pin = device.type == "cuda"
        self.windows = [Window(max(Window.DEFAULT_BYTES, 4 * self.chunk), pin=pin) for _ in self.sources]
        self._out: torch.Tensor | None = None
        self._out_bytes = 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        bigger = [f.vocab_size for f in fts if (f.vocab_size or 0) > (base.vocab_size or 0)]
        self.out_vocab_size: int | None = max(bigger) if bigger else None

    # -- output plan ---------------------------------------------------------------------------
    def output_shape(self, name: str) -> tuple[int, ...]:
        """Shape of merged ``name``: the base's, plus rows beyond the base's vocabulary that a
        fine-tuned model adds (the same rule as ``_job``)."""
        shape = self._shapes.get(name)
        if shape is None:
            raw = tuple(self.base.reader.shape(self.layout.source_key(0, name)))
            rows = raw[0] if raw else 0
            shapes = [tuple(ft.reader.shape(self.layout.source_key(i + 1, name))) for i, ft in enumerate(self.fts)]
            grown = [fs[0] - rows for fs in shapes if raw and fs != raw and fs[0] > rows]
            shape = self._shapes[name] = (rows + max(grown), *raw[1:]) if grown else raw
        return shape

    def output_dtype(self, name: str, out_dtype: torch.dtype | None) -> torch.dtype:
        dt = self.base.reader.dtype(self.layout.source_key(0, name))
        return (out_dtype or dt) if dt.is_floating_point else dt

    def output_plan(self, names: list[str], out_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple]]:
        """Every output tensor's (name, dtype, shape), in merge order: lets the writer lay out the shards."""
        plan = [(n, self.output_dtype(n, out_dtype), self.output_shape(n)) for n in names]
        self._out_bytes = max((math.prod(shape) * _element_size(dt) for _, dt, shape in plan), default=0)
        return plan

    def _out_buffer(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The merged tensor's memory: a view of one reused byte buffer (the writer copies it out
        before the next tensor is merged)."""
        shape = self.output_shape(name)
        n = math.prod(shape) * _element_size(dtype)
        if self._out is None or self._out.numel() < n:
            self._out = torch.empty(max(n, self._out_bytes, 1), dtype=torch.uint8)
        return self._out[:n].view(dtype).view(shape)

    def close(self) -> None:
        """Close the inputs' file descriptors (the readers reopen them if streamed again); the readers'
        own handles are left alone, since a caller may keep using its ``ModelSource``."""
        for src in self.sources:
            src.reader.close_streams()

    # -- reading -----------------------------------------------------------------------------
    def release(self, name: str) -> None:
        """Done with ``name`` in this pass: each reader unmaps a shard once all its tensors are done,
        so the inputs' mapped pages (counted in RSS) stay about one shard per model, not the model."""
        for i, src in enumerate(self.sources):
            src.reader.release(self.layout.source_key(i, name))

    def _get(self, src: ModelSource, name: str) -> torch.Tensor:
        """Output tensor ``name`` as ``src`` holds it (a tied model's head is its input embedding)."""
        index = next(i for i, s in enumerate(self.sources) if s is src)
        return src.reader.get(self.layout.source_key(index, name))

    def _read(self, src: ModelSource, name: str) -> torch.Tensor:
        """One input tensor, flat (CPU, stored dtype), read on demand (``acm.checkpoints.tensors.StreamedTensor``).

        Not checked for NaN/Inf here: every method carries a NaN/Inf in any input it uses into the
        merged tensor, even where it zeroes that entry (λ = 0, DARE drop, TIES trim or a losing sign:
        0·NaN and 0·Inf are NaN), so ``merge_tensor`` checks the one output instead of every input —
        one pass instead of 1 + n (benchmarks: −13 % CPU time for task arithmetic) — and only when the
        output is not finite re-reads the inputs to name the broken model (``_check_inputs``).
        ``linear`` (Σ wᵢθᵢ) does not use the base's values, so a broken base does not affect it.
        """
        index = next(i for i, s in enumerate(self.sources) if s is src)
        key = self.layout.source_key(index, name)
        if src.reader.dtype(key) not in (torch.float32, torch.bfloat16, torch.float16):
            return src.reader.get(key).to(torch.float32)
        return src.reader.stream(key, self.windows[index])

    def _check_inputs(self, name: str, out_dtype: torch.dtype) -> None:
        """The merged ``name`` is not finite: name the input that is broken, or say it overflowed."""
        for src in self.sources:
            if not kernels.finite(self._get(src, name)):
                role = "base model" if src is self.base else "fine-tuned model"
                raise InputError(f"{role} {src.spec} has NaN/Inf values in tensor {name}; "
                                 "this checkpoint is broken, merge a healthy one")
        raise InputError(f"merged tensor {name} has values outside the {str(out_dtype).replace('torch.', '')} range "
                         "(the inputs are finite); lower alpha / the coefficients or write another dtype (--dtype)")

    def _job(self, name: str, raw: torch.Tensor) -> tuple[kernels.TensorJob, list[torch.Tensor | None]]:
        """The chunked job for one tensor, plus each model's rows beyond the base (vocabulary growth).

        Rows a fine-tuned model lacks are simply absent from its flat input: they count as τᵢ = 0.
        """
        base_flat = raw.reshape(-1)
        shape = tuple(self.base.reader.shape(self.layout.source_key(0, name)))
        flats, extras = [], []
        for i, ft in enumerate(self.fts):
            f = self._read(ft, name).reshape(-1)
            fshape = tuple(ft.reader.shape(self.layout.source_key(i + 1, name)))
            extra = None
            if fshape != shape and fshape[0] > shape[0]:   # vocabulary rows differ (all check_compatibility allows)
                cut = base_flat.numel()
                extra = _flat_range(f, cut, f.numel()).view(fshape[0] - shape[0], *fshape[1:])
                f = f.narrow_flat(cut) if isinstance(f, StreamedTensor) else f[:cut]
            flats.append(f)
            extras.append(extra)
        return self.kernel.job(name, shape, base_flat, flats, self.ws, self.chunk, self.device), extras

    # -- maths ---------------------------------------------------------------------------------
    def merge_tensor(self, name: str, out_dtype: torch.dtype | None) -> torch.Tensor:
        """The merged ``name``, as a view of the reused output buffer: valid until the next call."""
        if not self.base.reader.dtype(self.layout.source_key(0, name)).is_floating_point:
            return self._get(self.base, name)          # integer buffers: copied from the base
        dtype = self.output_dtype(name, out_dtype)
        raw = self._read(self.base, name)
        rows = (self.base.reader.shape(self.layout.source_key(0, name)) or (0,))[0]
        job, extras = self._job(name, raw)
        grown = [e for e in extras if e is not None]
        out = self._out_buffer(name, dtype)
        flat = (out[:rows] if grown else out).reshape(-1)
        key = self.lambda_key(name)
        lams = [lam.get(key, lam[self.group_of[name]]) for lam in self.lams]
        self.kernel.merge(job, lams, flat, self.trim_specs(name))     # the spec's sparsify steps + combine
        if grown:
            self._append_rows(name, out, rows, extras)
        if not kernels.finite(out):
            self._check_inputs(name, dtype)
        return out

    def lambda_key(self, name: str) -> str:
        """The λ key of an output tensor: its layer group, except that the head group's tensors other
        than the output head itself (the final norm) take ``head.norm`` when the coefficients have it."""
        group = self.group_of[name]
        if group == HEAD and not (self.layout.merged_untied and name == self.layout.head_key):
            return NORM_KEY
        return group

    def _append_rows(self, name: str, out: torch.Tensor, rows: int, extras: list[torch.Tensor | None]) -> None:
        """Rows beyond the base's vocabulary come from the first fine-tuned model that has them."""
        for i in reversed(range(len(extras))):
            e = extras[i]
            if e is not None:
                out[rows: rows + e.shape[0]].copy_(e)
        covered = rows
        for i, e in enumerate(extras):
            if e is not None and rows + e.shape[0] > covered:
                self._grown.append(f"{name}: rows {covered}-{rows + e.shape[0] - 1} (beyond the base's {rows}) "
                                   f"taken from {self.fts[i].spec}")
                covered = rows + e.shape[0]

    def vocab_notes(self) -> list[str]:
        notes = list(self._grown)
        if self.out_vocab_size:
            notes.append(f"vocab_size {self.base.vocab_size} -> {self.out_vocab_size} in config.json; the tokenizer "
                         f"is the base's, so ids >= {self.base.vocab_size} are only reachable with the fine-tuned "
                         "model's tokenizer")
        return notes

    # -- global trim ---------------------------------------------------------------------------
    def global_thresholds(self, names: list[str], progress, bar) -> None:
        """One exact |τ| threshold per model over all tensors: two streaming histogram passes.

        Pass 1 counts the high 16 bits of every |τ| (float32 bit patterns order like the values),
        pass 2 the low 16 bits inside the one bucket holding the k-th largest: exact, O(65536) memory.
        """
        n = len(self.fts)
        float_names = [k for k in names if self.base.reader.dtype(self.layout.source_key(0, k)).is_floating_point]
        float_set = set(float_names)
        his = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(n)]
        los = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n)]
        totals = [0] * n
        located: list[tuple[int, int]] = []
        for phase in (0, 1):
            for name in names:
                if name not in float_set:
                    self.release(name)
            for j, name in enumerate(float_names):
                job, _ = self._job(name, self._read(self.base, name))
                job.start_pass()
                for i in range(n):
                    for a in job.abs_tau_chunks(i):
                        if phase == 0:
                            his[i] += kernels.hist_high(a)
                            totals[i] += a.numel()
                        else:
                            los[i] += kernels.hist_low(a, located[i][0])
                del job
                self.release(name)
                if progress is not None:
                    progress(0.25 * (phase + (j + 1) / len(float_names)),
                             f"global trim: {'histogram' if phase == 0 else 'refining'} at {name}")
                if bar is not None:
                    bar.update(len(names) / len(float_names))
            if phase == 0:
                located = [kernels.locate(h, kernels.keep_count(total, self.o.density)) for h, total in zip(his, totals)]
        self.thresholds = []
        tie_budget: list[int | None] = []
        for i, ((bucket, rank), lo) in enumerate(zip(located, los)):
            low_bits, _ = kernels.locate(lo, rank)
            value = kernels.bits_to_float((bucket << 16) | low_bits)
            above = int(his[i][bucket + 1:].sum()) + int(lo[low_bits + 1:].sum())
            spec = kernels.trim_spec(value, above, int(lo[low_bits]), kernels.keep_count(totals[i], self.o.density))
            self.thresholds.append(spec.threshold)
            tie_budget.append(spec.ties)
        self._global_ties = self._split_ties(float_names, tie_budget) if any(
            b is not None for b in tie_budget) else {}
        log.info("global trim thresholds: %s", self.thresholds)

    def _split_ties(self, float_names: list[str], budgets: list[int | None]) -> dict[str, list[int | None]]:
        """Global trim whose threshold ties overflow k: hand each tensor its share of the tie budget.

        Ties are broken in the order (tensor name sorted as text, flat index) — independent of the
        checkpoint's tensor order and of chunking. One extra counting pass finds how many entries
        of each tensor sit exactly at the threshold; only models whose ties overflow need it.
        """
        n = len(self.fts)
        equal: dict[str, list[int]] = {}
        for name in float_names:
            job, _ = self._job(name, self._read(self.base, name))
            job.start_pass()
            counts = [0] * n
            for i in range(n):
                if budgets[i] is None or self.thresholds[i] <= 0.0:
                    continue
                thr = self.thresholds[i]
                counts[i] = sum(int(torch.count_nonzero(a == thr)) for a in job.abs_tau_chunks(i))
            equal[name] = counts
            del job
            self.release(name)
        shares: dict[str, list[int | None]] = {}
        left = list(budgets)
        for name in sorted(float_names):
            row: list[int | None] = []
            for i in range(n):
                if budgets[i] is None:
                    row.append(None)
                else:
                    take = min(left[i], equal[name][i])
                    left[i] -= take
                    row.append(take)
            shares[name] = row
        return shares

    def trim_specs(self, name: str) -> list[kernels.TrimSpec] | None:
        """Global trim: each model's spec for tensor ``name`` (threshold + this tensor's tie share)."""
        if self.thresholds is None:
            return None
        ties = self._global_ties.get(name) or [None] * len(self.fts)
        return [kernels.TrimSpec(thr, tie) for thr, tie in zip(self.thresholds, ties)]


def _group_map(base: ModelSource, names: list[str], layout: HeadLayout) -> dict[str, str]:
    """Output tensor → group. A separate head is the ``head`` group even when the base's own config is
    tied (where the architecture would call ``lm_head`` an alias of the embedding)."""
    from acm.checkpoints.grouping import HEAD, build_group_map

    float_names = [k for k in names if base.reader.dtype(layout.source_key(0, k)).is_floating_point]
    mapping = build_group_map(base.config, float_names, trust_remote_code=base.trust_remote_code)
    if layout.merged_untied:
        mapping[layout.head_key] = HEAD
    return mapping


def _ordered_groups(base: ModelSource, group_of: dict[str, str]) -> list[str]:
    from acm.checkpoints.grouping import group_names

    present = set(group_of.values())
    return [g for g in group_names(base.num_layers) if g in present]


def _resolve_lambdas(lambdas: list[dict[str, float]] | None, groups: list[str], n: int,
                     options: MergeOptions, num_layers: int) -> list[dict[str, float]]:
    """One {group: λ} per fine-tuned model (linear: the normalised weights, same for every group)."""
    if not methods.SPECS[options.method].acm:          # linear: no task vectors, λ = the normalised weights
        if lambdas is not None:
            raise InputError("ACM coefficients scale task vectors and linear averaging has none; use "
                             f"{' / '.join(methods.ACM_METHODS)} for ACM, or merge linear without λ")
        weights = options.weights or [1.0] * n
        total = float(sum(weights))
        return [{g: float(w) / total for g in groups} for w in weights]
    if lambdas is None:
        return [{g: float(options.alpha) for g in groups} for _ in range(n)]
    if len(lambdas) != n:
        raise InputError(f"got coefficients for {len(lambdas)} fine-tuned model(s) but {n} model(s) to merge")
    from acm.checkpoints.grouping import group_names

    valid = set(group_names(num_layers)) | {NORM_KEY}
    out = []
    for i, lam in enumerate(lambdas):
        if not isinstance(lam, dict):
            raise InputError(f"coefficients for model {i + 1} must be a {{group: λ}} mapping")
        unknown = [g for g in lam if g not in valid]
        if unknown:
            raise InputError(f"coefficients for model {i + 1} name unknown layer group {unknown[0]!r}; "
                             f"this model's groups are embed, block.0 ... block.{num_layers - 1}, head "
                             f"(and {NORM_KEY} for the final norm)")
        missing = [g for g in groups if g not in lam]
        if missing:
            raise InputError(f"coefficients for model {i + 1} lack layer group {missing[0]!r}")
        keys = [*groups, *([NORM_KEY] if NORM_KEY in lam else [])]
        bad = [g for g in keys if not _finite(lam[g]) or float(lam[g]) < 0]
        if bad:
            raise InputError(f"coefficient for model {i + 1}, group {bad[0]} must be finite and >= 0, "
                             f"got {lam[bad[0]]}")
        out.append({g: float(lam[g]) for g in keys})
    return out


def _check_not_an_input(target: Path, sources: list[ModelSource]) -> None:
    """--force must never delete a model we are reading from."""
    t = target.resolve()
    for src in sources:
        p = src.path.resolve()
        if t == p or t in p.parents:
            raise InputError(f"output folder {target} is (or contains) the input model {src.spec}; "
                             "choose another --out")


def _flat_range(x, s: int, e: int) -> torch.Tensor:
    """Entries [s, e) of a flat input as a tensor of their own."""
    return x.read(s, e) if isinstance(x, StreamedTensor) else x[s:e]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_disk_space(base: ModelSource, names: list[str], layout: HeadLayout, target: Path,
                      out_dtype: torch.dtype | None) -> None:
    reader = base.reader
    need = 0
    for name in names:
        key = layout.source_key(0, name)
        dt = reader.dtype(key)
        size = _element_size(out_dtype) if (out_dtype is not None and dt.is_floating_point) else _element_size(dt)
        need += math.prod(reader.shape(key)) * size
    where = target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise InputError(f"not enough disk space in {where}: the merged model needs about {format_bytes(need)}, "
                         f"{format_bytes(free)} free")


def _base_dtype_name(base: ModelSource) -> str:
    """The dtype most of the base's floating-point weights are stored in."""
    by_dtype: dict[torch.dtype, int] = {}
    for key in base.reader.keys():
        dt = base.reader.dtype(key)
        if dt.is_floating_point:
            by_dtype[dt] = by_dtype.get(dt, 0) + math.prod(base.reader.shape(key))
    dt = max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
    return str(dt).replace("torch.", "")


def _embedding_rows(base: ModelSource, layout: HeadLayout) -> int:
    if layout.embed_key and layout.embed_key in base.reader:
        return int(base.reader.shape(layout.embed_key)[0])
    return int(base.vocab_size or 0)


def _check_tokenizer(src: ModelSource, index: int, rows: int) -> dict:
    """Load the tokenizer the merged model will carry and check its ids fit the merged vocabulary."""
    tok = tokenizer_facts(src.path, trust_remote_code=src.trust_remote_code)
    check_tokenizer_fits(tok, rows, what=f"the tokenizer of {src.spec} (--tokenizer-from {tokenizer_from_label(index)})")
    return {"from": tokenizer_from_label(index), "model": src.spec, "template": template_family(tok),
            "eos_token": tok.eos_token, "size": len(tok)}


_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _write_config(base: ModelSource, folder: Path, dtype_name: str, vocab_size: int | None, *,
                  untie: bool = False, token_ids_from: ModelSource | None = None) -> None:
    cfg = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    if token_ids_from is not None:        # special-token ids follow the tokenizer the merged model carries
        other = json.loads((token_ids_from.path / "config.json").read_text(encoding="utf-8"))
        for key in _TOKEN_ID_KEYS:
            if key in other:
                cfg[key] = other[key]
            else:
                cfg.pop(key, None)
    cfg["dtype"] = dtype_name
    if untie:                    # the merged model has its own head (acm.checkpoints.heads): transformers must not tie it
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name
    if vocab_size:
        if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
            cfg["vocab_size"] = vocab_size
        if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
            cfg["text_config"]["vocab_size"] = vocab_size
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_side_files(base: ModelSource, folder: Path, tokenizer_src: ModelSource | None = None) -> list[str]:
    """Copy every non-weight file of the base (licence, notices …); the tokenizer, chat template and
    generation defaults come from ``tokenizer_src`` (default: the base), never a mix of two."""
    tokenizer_src = tokenizer_src or base
    copied = []
    for path in sorted(base.path.iterdir()):
        name = path.name
        if (name.startswith(".") or name in _NOT_COPIED or name.endswith(_WEIGHT_SUFFIXES)
                or re.fullmatch(r".*\.index\.json", name) or not path.is_file()
                or (tokenizer_src is not base and is_tokenizer_file(name))):
            continue
        shutil.copyfile(path, folder / name)
        copied.append(name)
    if tokenizer_src is not base:
        copied += copy_tokenizer_files(tokenizer_src.path, folder)
    return copied


def default_cpu_threads() -> int:
    """Torch threads for a CPU merge: half the cores, 1 to 8.

    Why not all of them: the per-chunk maths is memory-bound, so extra threads add little, and
    on a busy machine every parallel op waits for its slowest thread — on a loaded 2-core box a
    single thread merged a 220M-parameter model 2-3× faster than two (measured with
    ``benchmarks/merge.py``-sized models). ``MergeOptions.threads`` / ``--threads`` override it.
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@contextlib.contextmanager
def _cpu_threads(threads: int | None, device: torch.device):
    """Run the merge with a bounded torch thread count (CPU only), restoring it afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merging", unit="tensor", leave=False)
