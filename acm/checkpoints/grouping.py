"""Layer groups: every parameter belongs to exactly one of ``embed``, ``block.0`` … ``block.{L-1}``, ``head``.

Grouping is structural, not a table of one family's names: we instantiate the architecture on
the ``meta`` device (no memory, no weights), find the ModuleList holding the L decoder blocks,
and assign parameters registered before it to ``embed``, inside block k to ``block.k``, and after
it (final norm, lm_head) to ``head``. Tied output embeddings share the input embedding's storage
and therefore belong to ``embed``. This works for Llama, Qwen2/3, Mistral, GPT-2 and any other
decoder-only model whose blocks live in one ModuleList.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from acm.checkpoints.config import full_config, num_layers_of
from acm.errors import InputError

EMBED = "embed"
HEAD = "head"
# The final norm's own λ key (the acm rule): tensors of the head group other than the output head itself.
NORM_GROUP = "head.norm"


def block_name(k: int) -> str:
    return f"block.{k}"


def group_names(num_layers: int) -> list[str]:
    """Groups in network order: embed, block.0 … block.{L-1}, head."""
    return [EMBED] + [block_name(k) for k in range(num_layers)] + [HEAD]


@dataclass
class GroupModules:
    """The modules whose outputs define each group's activations (used for forward hooks)."""

    embed: nn.Module
    blocks: nn.ModuleList
    blocks_prefix: str
    num_layers: int


def find_group_modules(model: nn.Module) -> GroupModules:
    """Locate the input embedding and the decoder-block ModuleList of a causal LM."""
    num_layers = num_layers_of(model.config)
    blocks_prefix, blocks = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                blocks_prefix, blocks = name, module
                break
    if blocks is None:
        raise InputError(
            f"unsupported architecture {type(model).__name__}: no list of {num_layers} decoder blocks found")
    embed = model.get_input_embeddings()
    if embed is None:
        raise InputError(f"unsupported architecture {type(model).__name__}: no input embedding module")
    return GroupModules(embed=embed, blocks=blocks, blocks_prefix=blocks_prefix, num_layers=num_layers)


def group_map_for_model(model: nn.Module) -> dict[str, str]:
    """Map every parameter name (tied aliases included) to its group."""
    modules = find_group_modules(model)
    prefix = modules.blocks_prefix + "."
    embed_storage = {id(p) for p in modules.embed.parameters()}
    mapping: dict[str, str] = {}
    seen_blocks = False
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            seen_blocks = True
            k = int(name[len(prefix):].split(".", 1)[0])
            mapping[name] = block_name(k)
        elif id(param) in embed_storage or not seen_blocks:
            mapping[name] = EMBED
        else:
            mapping[name] = HEAD
    # Tied output embeddings: an alias of the input embedding belongs to embed even if listed last.
    for name in _tied_aliases(model):
        mapping[name] = EMBED
    return mapping


def _tied_aliases(model: nn.Module) -> list[str]:
    tied = getattr(model, "_tied_weights_keys", None)
    if not tied or not getattr(model.config, "tie_word_embeddings", False):
        return []
    return list(tied)  # a dict {alias: source} in transformers 5, a list of aliases before


def meta_model(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with no weights (meta device): free to build even for 70B models."""
    from transformers import AutoModelForCausalLM

    config = full_config(config)

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise InputError(
            f"unsupported architecture {getattr(config, 'model_type', '?')!r} for causal LM merging: {exc}".splitlines()[0]
        ) from exc


@dataclass(frozen=True)
class Structure:
    """What the merge needs to know about an architecture, without its weights."""

    group_of: dict[str, str]      # parameter name (tied aliases included) -> group
    prefix: str                   # base-model prefix (``model``, ``transformer``)
    class_name: str
    embed_name: str | None        # the input embedding's weight, e.g. ``model.embed_tokens.weight``
    head_name: str | None         # the output head's weight, e.g. ``lm_head.weight`` (None: no head)

    def lookup(self, name: str) -> str | None:
        """Group of a checkpoint tensor name, tried as-is and with the base-model prefix."""
        return self.group_of.get(name) or (self.group_of.get(f"{self.prefix}.{name}") if self.prefix else None)

    def checkpoint_name(self, canonical: str | None, keys) -> str | None:
        """``canonical`` as this checkpoint spells it (with or without the prefix), or None if absent."""
        if canonical is None:
            return None
        if canonical in keys:
            return canonical
        if self.prefix and canonical.startswith(self.prefix + "."):
            short = canonical[len(self.prefix) + 1:]
            if short in keys:
                return short
        return None


def _weight_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None or getattr(module, "weight", None) is None:
        return None
    for name, mod in model.named_modules(remove_duplicate=False):
        if mod is module:
            return f"{name}.weight"
    return None


_STRUCTURE_CACHE: OrderedDict[tuple[str, bool], Structure] = OrderedDict()
_STRUCTURE_CACHE_SIZE = 8
_STRUCTURE_LOCK = threading.Lock()


# Decoder families whose checkpoint layout is read straight from the tensor names (no modeling code
# imported, no meta model built: the merge's and the Check button's start-up cost). Each family is
# pinned against the structural meta-model map in tests/test_grouping.py; any other model type, or a
# checkpoint whose names do not fit, takes the structural path.
_NAME_LAYOUTS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    # model_type: (base prefix, blocks path, input-embedding prefixes, head weight)
    **{t: ("model", "model.layers", ("model.embed_tokens.",), "lm_head.weight")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "granite", "phi3")},
    "gpt2": ("transformer", "transformer.h", ("transformer.wte.", "transformer.wpe."), "lm_head.weight"),
}


def structure(config, *, trust_remote_code: bool = False, names=None) -> Structure:
    """The architecture's group map and embedding / head tensor names.

    With checkpoint ``names`` of a known decoder family, read from the names alone (milliseconds);
    otherwise from the architecture built on the meta device (cached per config).
    """
    if names is not None and not trust_remote_code:
        found = _structure_from_names(config, names)
        if found is not None:
            return found
    return _structure(config, trust_remote_code)


def _structure_from_names(config, names) -> Structure | None:
    """Group map of a known family from its checkpoint names, or None when they do not fit exactly."""
    layout = _NAME_LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        return None
    prefix, blocks_path, embed_prefixes, head_name = layout
    try:
        num_layers = num_layers_of(config)
    except InputError:
        return None
    tied = bool(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "tie_word_embeddings", False))
    group_of: dict[str, str] = {}
    seen_blocks: set[int] = set()
    for raw in names:
        name = raw if raw.startswith(prefix + ".") or raw == head_name else f"{prefix}.{raw}"
        if name.startswith(blocks_path + "."):
            index = name[len(blocks_path) + 1:].split(".", 1)[0]
            if not index.isdigit() or int(index) >= num_layers:
                return None
            seen_blocks.add(int(index))
            group_of[name] = block_name(int(index))
        elif name.startswith(embed_prefixes):
            group_of[name] = EMBED
        elif name == head_name:
            group_of[name] = EMBED if tied else HEAD
        elif name.startswith(prefix + ".") and "." not in name[len(prefix) + 1:].rsplit(".", 1)[0]:
            group_of[name] = HEAD            # final norm: ``model.norm.weight``, ``transformer.ln_f.bias``
        else:
            return None
    if seen_blocks != set(range(num_layers)):
        return None
    group_of.setdefault(head_name, EMBED if tied else HEAD)
    embed_name = embed_prefixes[0] + "weight"
    return Structure(group_of, prefix, f"{getattr(config, 'model_type', '?')} (from tensor names)", embed_name,
                     head_name)


def _structure(config, trust_remote_code: bool) -> Structure:
    """(parameter → group, base-model prefix, class name, embed / head names), cached per config.

    Why cached: building the meta model is most of a small merge's fixed cost (15 ms of a 75 ms
    merge of a 10M-parameter model, more for deep models), and the app merges the same pair again
    for every t it is asked for. The key is the config's full JSON, so any change rebuilds it.
    """
    config = full_config(config)
    try:
        key = (config.to_json_string(use_diff=False), bool(trust_remote_code))
    except (TypeError, ValueError, AttributeError):   # a config that cannot be serialised: no caching
        key = None
    if key is not None:
        with _STRUCTURE_LOCK:                          # the app merges from several sessions' threads
            found = _STRUCTURE_CACHE.get(key)
            if found is not None:
                _STRUCTURE_CACHE.move_to_end(key)
                return found
    model = meta_model(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_name = _weight_name(model, model.get_input_embeddings())
    head_name = _weight_name(model, head)
    if head_name == embed_name:           # named_modules found the shared module under its first name
        head_name = None
    found = Structure(group_map_for_model(model), getattr(model, "base_model_prefix", "") or "",
                      type(model).__name__, embed_name, head_name)
    if key is not None:
        with _STRUCTURE_LOCK:
            _STRUCTURE_CACHE[key] = found
            while len(_STRUCTURE_CACHE) > _STRUCTURE_CACHE_SIZE:
                _STRUCTURE_CACHE.popitem(last=False)
    return found


def build_group_map(config, param_names: Iterable[str], *, trust_remote_code: bool = False) -> dict[str, str]:
    """Map checkpoint tensor names to groups; any name that maps to no group is an error.

    Checkpoints sometimes omit the base-model prefix (old GPT-2 files say ``h.0.attn`` for
    ``transformer.h.0.attn``), so a name is tried as-is and then with the prefix. The
    architecture's structure is built once per config and process (``_structure``).
    """
    param_names = list(param_names)
    found = structure(config, trust_remote_code=trust_remote_code, names=param_names)
    class_name = found.class_name
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for name in param_names:
        group = found.lookup(name)
        if group is None:
            unknown.append(name)
        else:
            mapping[name] = group
    if unknown:
        raise InputError(
            f"{len(unknown)} tensor(s) map to no layer group for {class_name}, e.g. {unknown[0]!r}; "
            "this checkpoint does not match its config")
    return mapping


def ordered_groups(mapping: dict[str, str]) -> list[str]:
    """The groups present in a mapping, in network order."""
    blocks = sorted({g for g in mapping.values() if g.startswith("block.")}, key=lambda g: int(g.split(".")[1]))
    present = set(mapping.values())
    return ([EMBED] if EMBED in present else []) + blocks + ([HEAD] if HEAD in present else [])
