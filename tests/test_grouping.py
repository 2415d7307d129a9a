"""Layer grouping (acm.checkpoints.grouping): every parameter of every family in exactly one group."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, T5Config

from acm.checkpoints.config import num_layers_of
from acm.checkpoints.grouping import (
    EMBED,
    HEAD,
    build_group_map,
    find_group_modules,
    group_map_for_model,
    group_names,
    ordered_groups,
)
from acm.checkpoints.models import resolve_model
from acm.errors import InputError
from tests.fixtures import make_tiny_model, tiny_config

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


def test_group_names_order():
    assert group_names(3) == ["embed", "block.0", "block.1", "block.2", "head"]
    assert group_names(0) == ["embed", "head"]


def _expected_group(name: str, family: str, tied: bool) -> str:
    """An independent, name-based oracle for the tiny configs (the code under test is structural)."""
    if family == "gpt2":
        if name.startswith("transformer.h."):
            return f"block.{name.split('.')[2]}"
        if name.startswith(("transformer.wte", "transformer.wpe")):
            return EMBED
        if name == "lm_head.weight":
            return EMBED if tied else HEAD
        return HEAD                                  # transformer.ln_f.*
    if name.startswith("model.layers."):
        return f"block.{name.split('.')[2]}"
    if name.startswith("model.embed_tokens"):
        return EMBED
    if name == "lm_head.weight":
        return EMBED if tied else HEAD
    return HEAD                                      # model.norm.weight


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_of_each_family(tmp_path, family, tied):
    path = make_tiny_model(tmp_path / family, family, num_hidden_layers=3, tie_word_embeddings=tied) \
        if family != "gpt2" else make_tiny_model(tmp_path / family, family, n_layer=3, tie_word_embeddings=tied)
    src = resolve_model(str(path))
    assert num_layers_of(src.config) == 3
    keys = src.reader.keys()
    mapping = build_group_map(src.config, keys)
    assert set(mapping) == set(keys)                 # every checkpoint tensor is mapped, exactly once
    assert ordered_groups(mapping) == group_names(3)
    for name, group in mapping.items():
        assert group == _expected_group(name, family, tied), name
    # the in-memory model: every parameter name, tied aliases included
    model = AutoModelForCausalLM.from_config(tiny_config(family, **({"n_layer": 3} if family == "gpt2" else
                                                                    {"num_hidden_layers": 3}),
                                                         tie_word_embeddings=tied))
    full = group_map_for_model(model)
    all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert all_names <= set(full)
    if tied:
        assert full["lm_head.weight"] == EMBED
    else:
        assert full["lm_head.weight"] == HEAD
    mods = find_group_modules(model)
    assert mods.num_layers == 3 and len(mods.blocks) == 3 and mods.embed is model.get_input_embeddings()


def test_checkpoint_names_without_the_base_prefix(tmp_path):
    src = resolve_model(str(make_tiny_model(tmp_path / "g", "gpt2")))
    names = [k.removeprefix("transformer.") for k in src.reader.keys()]
    mapping = build_group_map(src.config, names)
    assert mapping["h.1.attn.c_attn.weight"] == "block.1" and mapping["wte.weight"] == EMBED
    assert mapping["ln_f.weight"] == HEAD


def test_names_that_match_no_group_fail_clearly():
    with pytest.raises(InputError, match="map to no layer group") as e:
        build_group_map(tiny_config("llama"), ["model.layers.0.mlp.up_proj.weight", "extra.adapter.weight"])
    assert "extra.adapter.weight" in str(e.value) and "\n" not in str(e.value)


def test_unknown_architecture_fails_clearly():
    with pytest.raises(InputError, match="unsupported architecture") as e:
        build_group_map(T5Config(num_layers=1, d_model=8, d_ff=16, num_heads=1, d_kv=8, vocab_size=10), ["shared.weight"])
    assert "\n" not in str(e.value)


def test_model_without_a_block_list_fails_clearly():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_config("llama")
            self.emb = nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(InputError, match="no list of 2 decoder blocks"):
        find_group_modules(Weird())


def test_config_without_layer_count_fails_clearly():
    class Cfg:
        model_type = "mystery"

    with pytest.raises(InputError, match="number of layers"):
        num_layers_of(Cfg())


def test_meta_model_costs_no_memory():
    from acm.checkpoints.grouping import meta_model

    model = meta_model(tiny_config("llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=4))
    assert all(p.device == torch.device("meta") for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_name_layout_fast_path_equals_the_structural_map(tmp_path, family, tied):
    """The start-up fast path (names only, no modeling code) agrees with the meta-model structure."""
    from acm.checkpoints.grouping import _structure, _structure_from_names, structure

    layers = {"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3}
    src = resolve_model(str(make_tiny_model(tmp_path / family, family, tie_word_embeddings=tied, **layers)))
    keys = src.reader.keys()
    fast = _structure_from_names(src.config, keys)
    slow = _structure(src.config, False)
    assert fast is not None
    assert {k: fast.lookup(k) for k in keys} == {k: slow.lookup(k) for k in keys}
    assert (fast.embed_name, fast.head_name) == (slow.embed_name, slow.head_name)
    assert fast.lookup("lm_head.weight") == slow.lookup("lm_head.weight")
    assert structure(src.config, names=keys) is not None


def test_name_layout_refuses_names_that_do_not_fit():
    from acm.checkpoints.grouping import _structure_from_names

    cfg = tiny_config("llama", num_hidden_layers=2)
    good = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight"]
    assert _structure_from_names(cfg, good) is not None
    assert _structure_from_names(cfg, good + ["model.layers.2.mlp.up_proj.weight"]) is None   # block 2 of 2
    assert _structure_from_names(cfg, good + ["model.vision_tower.patch.weight"]) is None
    assert _structure_from_names(cfg, good[:2] + good[3:]) is None                           # block 1 missing
    assert _structure_from_names(tiny_config("llama"), []) is None
