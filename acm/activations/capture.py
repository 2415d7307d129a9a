"""Activation capture: every forward hook of the analysis, in one place.

Two kinds of capture run in the same forward passes, one model resident at a time (base pass first,
then each other model):

* ``GroupCapture`` — per layer group (``embed``, ``block.k``, ``head``), for the similarity metrics
  (NMI's binned pairs, CKA/cosine rows): hooks from ``attach_groups``, logits through ``observe_head``.
* ``SampleCapture`` — per calibration sample at the paper's activation points (``attach_points``:
  embedding output, each block's MLP output, the final norm's output, the logits), for the per-sample
  MI the acm rule needs (``acm.activations.sample_mi``).

Both see only real tokens: padding positions never enter an estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from acm.activations.estimators import DEFAULT_PAIR_BUDGET, DEFAULT_ROW_BUDGET
from acm.activations.mi import QUANTILES, StreamingMI, bin_indices, robust_range
from acm.activations.sample_mi import BinnedMI, LabelMI
from acm.checkpoints.grouping import EMBED, HEAD, NORM_GROUP, block_name, find_group_modules
from acm.errors import ACMError, InputError

HEAD_VOCAB_SUBSET = 4096


def activation_of(output: Any) -> torch.Tensor:
    """The activation tensor of a module's output (a tensor, the first of a tuple, or a model output's
    hidden states / logits)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for name in ("last_hidden_state", "logits"):
        t = getattr(output, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise ACMError(f"cannot read activations from a module output of type {type(output).__name__}")




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


class GroupCapture:
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

    # -- row metrics (CKA, cosine, …: acm.activations.similarity) ------------------------------------------
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
            self.observe(group, activation_of(output))
        return fn


def attach_groups(model: torch.nn.Module, capture: GroupCapture) -> list:
    """Forward hooks on the input embedding and every block: each layer group's output feeds ``capture``."""
    mods = find_group_modules(model)
    handles = [mods.embed.register_forward_hook(capture.hook(0))]
    for k, block in enumerate(mods.blocks):
        handles.append(block.register_forward_hook(capture.hook(k + 1)))
    return handles


def input_device(model: torch.nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device if emb is not None and getattr(emb, "weight", None) is not None else model.device


def head_ids(vocab: int, seed: int) -> torch.Tensor:
    if vocab <= HEAD_VOCAB_SUBSET:
        return torch.arange(vocab)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=gen)[:HEAD_VOCAB_SUBSET].sort().values




@dataclass
class Points:
    """The activation points of one model: names, their λ key (layer group), and the hooks feeding them."""

    names: list[str]
    groups: list[str]
    _handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def point_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(point names, λ keys) for a model of ``num_layers`` blocks, without loading it."""
    names = ["embed", *(f"{block_name(k)}.mlp" for k in range(num_layers)), "final_norm", "logits"]
    groups = [EMBED, *(block_name(k) for k in range(num_layers)), NORM_GROUP, HEAD]
    return names, groups


def attach_points(model: torch.nn.Module, sink: Callable[[int, torch.Tensor], None]) -> Points:
    """Forward hooks at the paper's activation points, calling ``sink(point, activation)``."""
    mods = find_group_modules(model)
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"unsupported architecture {type(model).__name__}: no output head to read logits from")
    names, groups = point_names(mods.num_layers)
    handles = []

    def out_hook(i: int):
        def hook(_m, _inp, out) -> None:   # returns None: a hook's return value would replace the output
            sink(i, activation_of(out))
        return hook

    def in_hook(i: int):
        def hook(_m, inp) -> None:
            sink(i, activation_of(inp))
        return hook

    handles.append(mods.embed.register_forward_hook(out_hook(0)))
    for k, block in enumerate(mods.blocks):
        mlp = getattr(block, "mlp", None)
        handles.append((mlp if mlp is not None else block).register_forward_hook(out_hook(k + 1)))
    handles.append(head.register_forward_pre_hook(in_hook(len(names) - 2)))
    handles.append(head.register_forward_hook(out_hook(len(names) - 1)))
    return Points(names=names, groups=groups, _handles=handles)


class SampleCapture:
    """Feeds a per-sample estimator from batched forward passes: each sample's real tokens only.

    ``begin_batch(first_sample, mask)`` before each forward; the hooks then split every activation
    ``[batch, tokens, width]`` into its samples' real-token rows (padding positions never enter).
    ``mode`` is ``base`` (keep) or the index of the other model (update). ``vocab``: logits columns
    compared (the vocabulary every model shares, when sizes differ), at the last point (the logits).
    """

    def __init__(self, estimator: LabelMI | BinnedMI, vocab: int | None = None):
        self.est = estimator
        self.vocab = vocab
        self.mode: str | int = "base"
        self.first = 0
        self.lengths: list[int] = []
        self.tokens: list[int] = [0] * estimator.num_samples

    def begin_batch(self, first_sample: int, mask: torch.Tensor) -> None:
        self.first = int(first_sample)
        self.lengths = [int(x) for x in mask.sum(dim=1).tolist()]
        self._rows = [mask[j].bool() for j in range(mask.shape[0])]
        self._on: dict[torch.device, list[torch.Tensor]] = {}
        if self.mode == "base":
            for j, n in enumerate(self.lengths):
                self.tokens[self.first + j] = n

    def _real(self, j: int, device: torch.device) -> torch.Tensor:
        rows = self._on.get(device)
        if rows is None:
            rows = self._on[device] = [r.to(device) for r in self._rows]
        return rows[j]

    def __call__(self, point: int, act: torch.Tensor) -> None:
        act = act.detach()
        if act.dim() == 2:                        # [tokens, width] from a model that drops the batch axis
            act = act.unsqueeze(0)
        if self.vocab is not None and point == self.est.num_points - 1:
            act = act[..., : self.vocab]           # logits of the token ids every model has
        for j in range(act.shape[0]):
            mask = self._real(j, act.device)
            real = act[j] if bool(mask.all()) else act[j][mask]
            if self.mode == "base":
                self.est.keep(point, self.first + j, real)
            else:
                self.est.update(int(self.mode), point, self.first + j, real)
