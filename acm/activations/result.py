"""The analysis result file: per-group similarity and per-sample MI of base vs each fine-tuned model, with
everything needed to reproduce it. Reading validates (one-line errors); writing is atomic.

Why its own module: the app, the CLI, the rules and the cache read and write analysis files without
running an analysis (and without importing the capture code).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from acm.errors import InputError

FORMAT = "acm-analysis"
FORMAT_VERSION = 1


@dataclass
class ModelNMI:
    """One fine-tuned model's per-group statistics (lists in network order)."""

    model: str
    nmi: list[float]
    mi: list[float]
    entropy_base: list[float] = field(default_factory=list)
    entropy_ft: list[float] = field(default_factory=list)
    similarity: dict[str, list[float]] = field(default_factory=dict)   # other metrics: {"cka": [...], ...}
    sample_mi: list[list[float]] = field(default_factory=list)          # [points][samples] nats (acm.activations.sample_mi)

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
    # Per-sample MI (acm.activations.sample_mi): {"estimator", "points", "point_groups", "tokens", "max_values", "bins",
    # "values_per_point"}; empty for analyses made before the paper's rule (they still load).
    sample_info: dict = field(default_factory=dict)
    # The fim rule's Fisher pass (acm.activations.fisher): {"keys", "scores", "params", "sequences", "length", "seed",
    # "loss", "vocab", ..., "delta_sq": [per model, per key]}; empty when the analysis ran no Fisher pass.
    fisher: dict = field(default_factory=dict)
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

    def has_fisher(self) -> bool:
        """Whether the file carries the fim rule's Fisher pass (and ‖δ‖² for every model)."""
        return bool(self.fisher) and len(self.fisher.get("delta_sq") or []) == len(self.models)

    def fisher_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(fim keys, Fisher per key [keys], ‖δ‖² [models, keys]); InputError, one line, without a Fisher pass."""
        if not self.has_fisher():
            raise InputError("this analysis has no Fisher pass (the fim rule's); run `acm analyze --rule fim` "
                             "(no calibration needed), or `acm merge --rule fim` without --acm to run it on the fly")
        return (list(self.fisher["keys"]), np.asarray(self.fisher["scores"], dtype=np.float64),
                np.asarray(self.fisher["delta_sq"], dtype=np.float64))

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
        """[n_models, n_groups] similarity in [0, 1] of ``metric`` (``acm.activations.similarity.METRICS``)."""
        return np.array([m.values(metric) for m in self.models],
                        dtype=np.float64).reshape(len(self.models), len(self.groups))

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "groups": list(self.groups),
             "models": [m.to_dict() for m in self.models], "provenance": self.provenance}
        if self.sample_info:
            d["sample_mi"] = self.sample_info
        if self.fisher:
            d["fisher"] = self.fisher
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
        fisher = _check_fisher(d.get("fisher"), len(models))
        for m in models:
            if not m.has_values() and not fisher:
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
        return cls(groups=groups, models=models, provenance=dict(d.get("provenance") or {}), sample_info=dict(info),
                   fisher=fisher)

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


def _check_fisher(block, n_models: int) -> dict:
    """The ``fisher`` block checked: one Fisher value per key, ‖δ‖² per model and key, all finite and ≥ 0."""
    if not block:
        return {}
    if not isinstance(block, dict):
        raise InputError("malformed ACM analysis ('fisher' must be an object)")
    try:
        keys = [str(k) for k in block["keys"]]
        scores = [float(x) for x in block["scores"]]
        delta = [[float(x) for x in row] for row in block.get("delta_sq") or []]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed ACM analysis ('fisher' block: {type(exc).__name__}: {exc})") from None
    if not keys or len(scores) != len(keys) or len(delta) != n_models or any(len(r) != len(keys) for r in delta):
        raise InputError(f"ACM analysis: the Fisher block needs one score per key ({len(keys)} keys) and ‖δ‖² for "
                         f"each of the {n_models} model(s)")
    if not all(math.isfinite(x) and x >= 0 for x in scores + [v for r in delta for v in r]):
        raise InputError("ACM analysis: the Fisher block has a negative or non-finite value")
    return {**block, "keys": keys, "scores": scores, "delta_sq": delta}


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


__all__ = ["FORMAT", "FORMAT_VERSION", "AnalysisResult", "ModelNMI"]
