"""Pre-flight compatibility of a base and its fine-tuned models, from configs and safetensors headers only.

Why its own module: the check needs model sources, layer groups and the output-head layout, which
each live in their own module; here it may use all three without any of them importing another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from acm.checkpoints.heads import head_layout
from acm.checkpoints.limits import check_num_fine_tuned
from acm.checkpoints.models import ModelSource
from acm.errors import CompatibilityError


@dataclass
class CompatibilityReport:
    """What the pre-flight check found; shown in the UI and recorded in exports."""

    architecture: str
    num_layers: int
    hidden_size: int | None
    parameters: dict[str, int]           # model spec -> parameter count
    vocab_sizes: dict[str, int]          # model spec -> rows of the input embedding
    vocab_notes: list[str]               # human-readable notes on vocabulary differences
    heads: dict = field(default_factory=dict)   # tied/untied per model and merged (acm.checkpoints.heads.HeadLayout.describe)
    head_notes: list[str] = field(default_factory=list)
    layout: Any = field(default=None, repr=False)   # acm.checkpoints.heads.HeadLayout (for the merge)

    def summary(self) -> str:
        lines = [f"{self.architecture}: {self.num_layers} layers, hidden size {self.hidden_size}"]
        per_model = self.heads.get("models", {})
        for name, count in self.parameters.items():
            head = f", {per_model[name]} head" if name in per_model else ""
            lines.append(f"  {name}: {count / 1e6:.2f}M parameters, vocab {self.vocab_sizes.get(name)}{head}")
        lines.extend(f"  note: {n}" for n in self.vocab_notes + self.head_notes)
        return "\n".join(lines)


def _arch(src: ModelSource) -> str:
    return (getattr(src.config, "architectures", None) or [getattr(src.config, "model_type", "?")])[0]


def _vocab_dim_keys(src: ModelSource) -> set[str]:
    """Tensors whose first dimension is the vocabulary (input embedding, lm_head)."""
    vocab = src.vocab_size
    return {k for k in src.reader.keys() if vocab and src.reader.shape(k) and src.reader.shape(k)[0] == vocab
            and len(src.reader.shape(k)) == 2 and ("embed" in k or "wte" in k or "lm_head" in k or "output" in k)}


def check_compatibility(base: ModelSource, fts: list[ModelSource]) -> CompatibilityReport:
    """Fail with one line naming the first mismatch; vocab size may differ (reported)."""

    check_num_fine_tuned(len(fts))

    notes: list[str] = []
    base_vocab_keys = _vocab_dim_keys(base)
    for ft in fts:
        for what, get in (("architecture", _arch), ("model type", lambda s: getattr(s.config, "model_type", None)),
                          ("layer count", lambda s: s.num_layers), ("hidden size", lambda s: s.hidden_size)):
            a, b = get(base), get(ft)
            if a != b:
                raise CompatibilityError(f"{what} differs: base {base.spec} has {a}, fine-tuned {ft.spec} has {b}")
    layout = head_layout(base, fts)           # a tied model has no head tensor: compare the rest
    head = {layout.head_key} if layout.head_key else set()
    for ft in fts:
        base_keys, ft_keys = set(base.reader.keys()) - head, set(ft.reader.keys()) - head
        if base_keys != ft_keys:
            only_base, only_ft = sorted(base_keys - ft_keys), sorted(ft_keys - base_keys)
            example = (f"{only_base[0]!r} only in the base" if only_base else f"{only_ft[0]!r} only in {ft.spec}")
            raise CompatibilityError(f"tensor names differ between {base.spec} and {ft.spec}: {example}")
        for key in sorted(base_keys):
            a, b = base.reader.shape(key), ft.reader.shape(key)
            if a == b:
                continue
            if key in base_vocab_keys and a[1:] == b[1:]:
                continue  # vocabulary rows differ; handled by the merge (see docs/design.md)
            raise CompatibilityError(f"shape of {key} differs: base {list(a)}, {ft.spec} {list(b)}")
        if ft.vocab_size != base.vocab_size:
            larger = (ft.vocab_size or 0) > (base.vocab_size or 0)
            what = "extra rows are taken from the fine-tuned model" if larger else "missing rows keep the base values"
            notes.append(f"{ft.spec} has vocabulary {ft.vocab_size} vs base {base.vocab_size}: {what}")
    models = [base] + list(fts)
    specs = [m.spec for m in models]
    head_note = layout.note(specs)
    return CompatibilityReport(
        architecture=_arch(base), num_layers=base.num_layers, hidden_size=base.hidden_size,
        parameters={m.spec: m.reader.numel() for m in models},
        vocab_sizes={m.spec: m.vocab_size for m in models}, vocab_notes=notes,
        heads=layout.describe(specs),
        head_notes=[head_note] if head_note else [], layout=layout)
