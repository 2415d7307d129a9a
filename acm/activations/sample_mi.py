"""Per-sample mutual information at the paper's activation points (arXiv 2505.14009, Eq. 1 + translation).

Why per sample: the paper computes the MI between the base's and a fine-tuned model's activations
per calibration sample ("data piece") and translates it by the largest per-sample value before the
sigmoid of Eq. 2, so the rule needs a [points × samples] matrix, not one number per layer.

Activation points (as in a public derivative of the authors' code): the input embedding's output,
each block's MLP output (``mlp(x) = down_proj(…)`` in Llama/Qwen/Mistral; ``dropout(c_proj(…))`` in
GPT-2, identical in eval mode), the final norm's output (read as the input of the output head) and
the logits. Each point belongs to a layer group (``acm.checkpoints.grouping``): embedding → ``embed``; block k's
MLP → ``block.k``; final norm → ``head.norm`` (its own λ: the final-norm tensors of the ``head``
group); logits → ``head``.

Estimators (one number per (point, sample), split into ``keep`` for the base pass and ``update`` for
each other model's pass, so one model is resident at a time):

* ``labels`` (default, the derivative's): discrete MI of the flattened values cast to bf16, the bf16
  bit pattern taken as the label. Computed in torch on the activations' device (pair ids +
  ``torch.unique``), equal to scikit-learn's ``mutual_info_score`` on the same labels (a test checks).
* ``binned``: this project's B-bin joint histogram (``acm.activations.mi``) of each sample's values, ranges fixed per
  point by robust quantiles of the first sample (base and other model separately).

What the base pass keeps is bounded: at most ``max_values`` values per (sample, point) (default 2¹⁸;
a seeded uniform draw with replacement beyond it, the same draw in every pass) as int16 labels or
uint8 bins. A 152k-wide logits point of a 512-token sample has 78 M values: the cap keeps 262,144.
``max_values=None`` keeps every value (for exact comparisons on small models).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from acm.activations.estimators import DEFAULT_MAX_VALUES, ESTIMATORS, check_estimator, check_max_values
from acm.errors import ACMError

# ----------------------------------------------------------------------------- the MI itself


def discrete_mi(x: torch.Tensor, y: torch.Tensor) -> float:
    """MI (nats) of two equally long label vectors: Σ p(x,y)·log(p(x,y) / (p(x)·p(y))).

    In torch on the labels' device: one ``unique`` per side (inverse ids), one ``unique`` of the pair
    ids, counts gathered back — O(n log n), no contingency matrix. Same value as scikit-learn's
    ``mutual_info_score`` (float64 sums; clipped at 0 like it).
    """
    if x.shape != y.shape:
        raise ACMError(f"MI needs paired values: got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.numel()
    if n == 0:
        return math.nan
    ux, ix = torch.unique(x.reshape(-1), return_inverse=True)
    uy, iy = torch.unique(y.reshape(-1), return_inverse=True)
    if ux.numel() == 1 or uy.numel() == 1:
        return 0.0
    pair = ix.to(torch.int64) * uy.numel() + iy.to(torch.int64)
    up, n_xy = torch.unique(pair, return_counts=True)
    n_x = torch.bincount(ix.reshape(-1), minlength=ux.numel())[up // uy.numel()]
    n_y = torch.bincount(iy.reshape(-1), minlength=uy.numel())[up % uy.numel()]
    n_xy, n_x, n_y = n_xy.double(), n_x.double(), n_y.double()
    mi = (n_xy / n * (torch.log(n_xy) + math.log(n) - torch.log(n_x) - torch.log(n_y))).sum()
    return max(0.0, float(mi))


def bf16_labels(values: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int16) as discrete labels: equal labels ⇔ equal bf16 values (``+ 0`` turns −0
    into +0, which compare equal as values)."""
    return (values.detach().to(torch.bfloat16) + 0).view(torch.int16)


# ----------------------------------------------------------------------------- estimators


class _PerSample:
    """Storage shared by the estimators: base values kept per (point, sample), MI per other model."""

    key = ""

    def __init__(self, num_points: int, num_samples: int, num_models: int = 1, *,
                 max_values: int | None = DEFAULT_MAX_VALUES, seed: int = 0):
        self.num_points, self.num_samples, self.num_models = int(num_points), int(num_samples), int(num_models)
        self.max_values = None if max_values is None else int(max_values)
        self.seed = int(seed)
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        self._mi = np.full((self.num_models, self.num_points, self.num_samples), np.nan)
        self.values_per_point = [0] * self.num_points     # values compared per sample, largest seen

    def flat(self, point: int, sample: int, act: torch.Tensor) -> torch.Tensor:
        """The activation flattened, restricted to the same seeded subset in every pass."""
        v = act.detach().reshape(-1)
        n = v.numel()
        if self.max_values is None or n <= self.max_values:
            self.values_per_point[point] = max(self.values_per_point[point], n)
            return v
        self.values_per_point[point] = self.max_values
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + point) * 1_000_003 + sample)
        idx = torch.randint(0, n, (self.max_values,), generator=gen).to(v.device)
        return v[idx]

    def kept(self, point: int, sample: int) -> torch.Tensor:
        try:
            return self._kept[(point, sample)]
        except KeyError:
            raise ACMError(f"activation point {point}, sample {sample}: no base activations were kept") from None

    def mi(self, model: int = 0) -> np.ndarray:
        """[points, samples] MI in nats of base vs other model ``model`` (NaN where nothing arrived)."""
        return self._mi[model].copy()

    def state_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._kept.values()) + self._mi.nbytes)

    def clear(self) -> None:
        self._kept.clear()


class LabelMI(_PerSample):
    """The derivative's estimator: discrete MI of the flattened bf16 values taken as labels."""

    key = "labels"

    def keep(self, point: int, sample: int, base_act: torch.Tensor) -> None:
        self._kept[(point, sample)] = bf16_labels(self.flat(point, sample, base_act)).cpu()

    def update(self, model: int, point: int, sample: int, other_act: torch.Tensor) -> None:
        y = bf16_labels(self.flat(point, sample, other_act))
        x = self.kept(point, sample).to(y.device, non_blocking=True)
        self._mi[model, point, sample] = discrete_mi(x, y)


class BinnedMI(_PerSample):
    """This project's estimator per sample: a B×B joint histogram (``acm.activations.mi``) of each sample's values."""

    key = "binned"

    def __init__(self, num_points: int, num_samples: int, num_models: int = 1, *, bins: int = 64,
                 max_values: int | None = DEFAULT_MAX_VALUES, seed: int = 0):
        from acm.activations.mi import check_bins

        super().__init__(num_points, num_samples, num_models, max_values=max_values, seed=seed)
        self.bins = check_bins(bins)
        self.x_range: list[tuple[float, float] | None] = [None] * self.num_points
        self.y_range: list[list[tuple[float, float] | None]] = [[None] * self.num_points
                                                                for _ in range(self.num_models)]

    def _bins(self, values: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
        from acm.activations.mi import bin_indices

        return bin_indices(values, *rng, self.bins).to(torch.uint8 if self.bins <= 256 else torch.int16)

    def keep(self, point: int, sample: int, base_act: torch.Tensor) -> None:
        from acm.activations.mi import robust_range

        v = self.flat(point, sample, base_act)
        if self.x_range[point] is None:
            self.x_range[point] = robust_range(v, seed=self.seed)
        self._kept[(point, sample)] = self._bins(v, self.x_range[point]).cpu()

    def update(self, model: int, point: int, sample: int, other_act: torch.Tensor) -> None:
        from acm.activations.mi import StreamingMI, robust_range

        v = self.flat(point, sample, other_act)
        if self.y_range[model][point] is None:
            self.y_range[model][point] = robust_range(v, seed=self.seed)
        iy = self._bins(v, self.y_range[model][point])
        ix = self.kept(point, sample).to(iy.device)
        if ix.shape != iy.shape:
            raise ACMError(f"activation point {point}: base and other activations differ in size")
        est = StreamingMI(1, self.bins)
        est.add_indices(0, ix.to(torch.int32), iy)
        self._mi[model, point, sample] = float(est.mi()[0])


def make_estimator(key: str, num_points: int, num_samples: int, num_models: int = 1, *, bins: int = 64,
                   max_values: int | None = DEFAULT_MAX_VALUES, seed: int = 0) -> LabelMI | BinnedMI:
    """The per-sample MI estimator registered under ``key`` (``labels`` or ``binned``)."""
    key = check_estimator(key)
    max_values = check_max_values(max_values)
    if key == "labels":
        return LabelMI(num_points, num_samples, num_models, max_values=max_values, seed=seed)
    return BinnedMI(num_points, num_samples, num_models, bins=bins, max_values=max_values, seed=seed)


__all__ = ["DEFAULT_MAX_VALUES", "ESTIMATORS", "BinnedMI", "LabelMI", "bf16_labels", "check_estimator",
           "check_max_values", "discrete_mi", "make_estimator"]
