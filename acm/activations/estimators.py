"""The estimators' names, defaults and limits, torch-free (per-sample MI; NMI's and the row metrics' budgets).

Why its own module: the analysis (which runs the estimators, ``acm.activations.sample_mi``) and the
rule registry (which offers them as a parameter, ``acm.rules``, imported by the UI to build widgets
cheaply) need the same names, default and validators; the registry and the CLI parsers (``acm --help``)
must not import torch.
"""

from __future__ import annotations

from typing import Any

from acm.errors import InputError

ESTIMATORS = ("labels", "binned")
MAX_VALUES_RANGE = (1024, 1 << 24)
DEFAULT_MAX_VALUES = 1 << 18     # values per (sample, activation point): 512 KiB of int16 labels
DEFAULT_PAIR_BUDGET = 1 << 22   # paired values kept per layer group (≈ 4.2 M; 4 MiB of uint8 base bins)
# Row metrics (CKA, cosine): tokens paired per group. Stored: ≤ 8192 × sketch_dim (128) float32 = 4 MiB per
# group and metric; beyond it a seeded subset of tokens (the same for every group and pass).
DEFAULT_ROW_BUDGET = 1 << 13


def check_estimator(key: Any) -> str:
    """``labels`` or ``binned`` (any case), else one line."""
    s = str(key).strip().lower()
    if s not in ESTIMATORS:
        raise InputError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {key!r}")
    return s


def check_max_values(v: Any) -> int | None:
    """0 / None keep every value; otherwise an integer in MAX_VALUES_RANGE."""
    if v is None or (not isinstance(v, bool) and v == 0):
        return None
    lo, hi = MAX_VALUES_RANGE
    if isinstance(v, bool):
        raise InputError(f"max values must be an integer, got {v!r}")
    try:
        x = int(v)
    except (TypeError, ValueError):
        raise InputError(f"max values must be an integer, got {v!r}") from None
    if x != float(v) or not lo <= x <= hi:
        raise InputError(f"max values must be an integer in [{lo}, {hi}], got {v!r}")
    return x
