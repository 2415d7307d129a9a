"""Per-tensor merge maths: task vectors, the sparsification strategies, the consensus step, the chunked driver.

Why a separate package: these modules are the whole numerical definition of the merge methods
(docs/design.md "Merge methods"); the engine in ``acm.merging.engine`` only streams tensors through them.
A method (``acm.merging.methods.MethodSpec``) names its strategies torch-free; ``MethodKernel`` builds them:

* ``workspace``   — chunk sizes (``CPU_CHUNK`` / ``GPU_CHUNK``), the reused float32 ``Workspace``, ``stable_seed``,
  ``finite``, and ``Step`` (the sparsification protocol every step implements);
* ``selection``   — exact top-k by |τ| (``TrimSpec``, sampled band + ``BandCounter``, histogram radix select for
  the global trim) and the TIES step ``MagnitudeTrim``;
* ``random_drop`` — DARE: ``DropStream`` and the ``RandomDrop`` step;
* ``rank_drop``   — DELLA: ``DellaStream`` and the ``RankDrop`` step;
* ``outliers``    — Breadcrumbs: ``apply_cut`` and the ``OutlierTrim`` step;
* ``consensus``   — ``elect`` / ``weighted_sum`` and the combiners ``SignElection``, ``Sum``, ``Average``;
* ``job``         — ``TensorJob`` (the chunked passes) and ``MethodKernel`` (a spec's strategies for one merge).

Each module's docstring holds its exact conventions (counts, tie-breaks, random streams). The modules import
only numpy, torch and each other (relatively), so a tree's copy can be loaded on its own (benchmarks/ab.py).
The engine reads ``CPU_CHUNK`` / ``GPU_CHUNK`` from this package: tests that shrink the chunk patch them here;
the selection's sampling constants (``_EXACT_BELOW``, ``_SAMPLE``, ``_band`` …) are patched on ``selection``.
"""

from __future__ import annotations

from .consensus import Average, SignElection, Sum, elect, weighted_sum
from .job import MethodKernel, TensorJob
from .outliers import OutlierSelection, OutlierTrim, apply_cut, outlier_counts
from .random_drop import DropStream, RandomDrop, dare_
from .rank_drop import DellaStream, RankDrop, della_rows
from .selection import (
    BandCounter,
    MagnitudeTrim,
    Selection,
    TrimSpec,
    apply_trim,
    bits_to_float,
    exact_trim,
    hist_high,
    hist_low,
    keep_count,
    kth_largest,
    kth_largest_abs,
    locate,
    trim,
    trim_spec,
)
from .workspace import CPU_CHUNK, GPU_CHUNK, Step, Workspace, finite, stable_seed

__all__ = [
    "CPU_CHUNK", "GPU_CHUNK", "Step", "Workspace", "finite", "stable_seed",
    "BandCounter", "MagnitudeTrim", "Selection", "TrimSpec", "apply_trim", "bits_to_float", "exact_trim",
    "hist_high", "hist_low", "keep_count", "kth_largest", "kth_largest_abs", "locate", "trim", "trim_spec",
    "DropStream", "RandomDrop", "dare_", "DellaStream", "RankDrop", "della_rows",
    "OutlierSelection", "OutlierTrim", "apply_cut", "outlier_counts",
    "Average", "SignElection", "Sum", "elect", "weighted_sum",
    "MethodKernel", "TensorJob",
]
