"""Tied and untied output heads: which tensor is each model's head, and what the merged model gets.

Why a module of its own: the paper's own Long-to-Short pair mixes them. Qwen2.5-Math-1.5B ties
its head to the input embedding (``tie_word_embeddings: true``, no ``lm_head.weight`` in the
checkpoint) while DeepSeek-R1-Distill-Qwen-1.5B has its own ``lm_head.weight``. The rules
(docs/formulas.md, docs/design.md "Tied heads"):

* a tied model's head *is* its input embedding, so its head tensor is read from the embedding;
* the merged model is untied as soon as any input has its own head: it gets a head tensor
  ``θ₀,head + Σᵢ λᵢ,head·(headᵢ − θ₀,head)`` (with the tied models' heads read from their
  embeddings) and ``tie_word_embeddings: false``; the input embedding is merged with λ_embed;
* when every input is tied, the merged model is tied too and has no head tensor.

A checkpoint whose config says tied but which still stores a head tensor (a redundant copy that
transformers ignores when loading) is treated as tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from acm.errors import CompatibilityError

# An acm.checkpoints.models.ModelSource (not imported: models sits above heads in this package).
Source = Any


def is_tied(config) -> bool:
    """Whether the config ties the output head to the input embedding (text config for multimodal)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


@dataclass(frozen=True)
class HeadLayout:
    """The embedding / head tensors of a set of models (base first) and the merged model's layout."""

    embed_key: str | None            # checkpoint name of the input embedding
    head_key: str | None             # checkpoint name of the output head (None: the architecture has none)
    own_head: tuple[bool, ...]       # per model (base first): has its own, untied head tensor
    redundant: tuple[bool, ...]      # per model: tied, yet stores a head tensor anyway (ignored)

    @property
    def merged_untied(self) -> bool:
        return self.head_key is not None and any(self.own_head)

    @property
    def mixed(self) -> bool:
        return self.merged_untied and not all(self.own_head)

    def source_key(self, index: int, name: str) -> str:
        """The tensor model ``index`` (0 = base) holds for output tensor ``name``: a tied model's head
        is read from its input embedding."""
        if name == self.head_key and not self.own_head[index] and self.embed_key is not None:
            return self.embed_key
        return name

    def output_names(self, base_keys: list[str]) -> list[str]:
        """The merged model's tensor names: the base's, less a redundant head copy, plus the head when
        the merged model is untied and the base has none."""
        names = [k for k in base_keys if not (k == self.head_key and not self.own_head[0])]
        if self.merged_untied and self.head_key not in names:
            names.append(self.head_key)
        return names

    def describe(self, specs: list[str]) -> dict:
        """JSON-ready summary for provenance, recipes and the model card."""
        def kind(i: int) -> str:
            return "untied" if self.own_head[i] else "tied"
        return {"base": kind(0), "fine_tuned": [kind(i) for i in range(1, len(self.own_head))],
                "merged": "untied" if self.merged_untied else "tied",
                "embed_tensor": self.embed_key, "head_tensor": self.head_key,
                "models": {spec: kind(i) for i, spec in enumerate(specs)}}

    def note(self, specs: list[str]) -> str | None:
        """A human line for mixed layouts (None when every model agrees)."""
        if not self.mixed:
            return None
        tied = [s for s, own in zip(specs, self.own_head) if not own]
        return (f"output heads: {', '.join(tied)} tied (head = input embedding), the others untied; the merged "
                f"model is untied: {self.head_key} = base head + Σ λ_head·(head − base head), a tied model's "
                "head read from its input embedding")


def head_layout(base: Source, fts: list[Source]) -> HeadLayout:
    """Find every model's head tensor; one clear line when a head is missing or the wrong shape.

    Cheap: reads configs and safetensors headers only (the architecture's names come from
    ``acm.checkpoints.grouping.structure``).
    """
    from acm.checkpoints.grouping import structure

    models = [base, *fts]
    keys = [set(m.reader.keys()) for m in models]
    found = structure(base.config, trust_remote_code=base.trust_remote_code, names=sorted(keys[0]))
    embed_key = found.checkpoint_name(found.embed_name, keys[0])
    head_key = None
    if found.head_name is not None:
        head_key = next((found.checkpoint_name(found.head_name, k) for k in keys
                         if found.checkpoint_name(found.head_name, k)), None) or found.head_name
    own, redundant = [], []
    for m, k in zip(models, keys):
        has = head_key is not None and head_key in k
        tied = is_tied(m.config)
        if not tied and head_key is not None and not has:
            raise CompatibilityError(f"{m.spec} says its head is untied (tie_word_embeddings false) but its "
                                     f"checkpoint has no {head_key}: the checkpoint is incomplete")
        own.append(has and not tied)
        redundant.append(has and tied)
    layout = HeadLayout(embed_key, head_key, tuple(own), tuple(redundant))
    if layout.merged_untied:
        _check_head_shapes(models, layout)
    return layout


def _check_head_shapes(models: list[Source], layout: HeadLayout) -> None:
    """Every model's effective head [vocab, hidden] must agree with the base's except in vocabulary rows."""
    def head_shape(i: int) -> tuple[str, tuple[int, ...]]:
        key = layout.source_key(i, layout.head_key)
        return key, tuple(models[i].reader.shape(key))

    base_key, base_shape = head_shape(0)
    for i in range(1, len(models)):
        key, shape = head_shape(i)
        if shape[1:] != base_shape[1:]:
            what = {True: "its own head", False: "its tied head (input embedding)"}
            raise CompatibilityError(
                f"output head differs: base {models[0].spec} has {what[layout.own_head[0]]} {base_key} "
                f"{list(base_shape)}, {models[i].spec} has {what[layout.own_head[i]]} {key} {list(shape)}")
