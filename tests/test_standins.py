"""Checks of the stand-ins themselves (tests/standins.py), not of the merge code: each folder loads, generates,
and carries the real structural quirks recorded in its facts dict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests import standin_templates
from tests.standins import BYTE_VOCAB, PAIRS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROLES = [(name, role) for name in PAIRS for role in ("base", "ft")]
IDS = [f"{n}-{r}" for n, r in ROLES]
CHAT = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]


def _folder(standin_pair, name, role):
    base, ft = standin_pair(name)
    return base if role == "base" else ft


def _facts(name, role):
    return getattr(PAIRS[name], role)


def _tensor_names(folder) -> dict[str, tuple]:
    """name -> shape over every safetensors file of a folder (sharded or not)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


@pytest.mark.parametrize("name,role", ROLES, ids=IDS)
def test_loads_and_generates(standin_pair, name, role):
    folder = _folder(standin_pair, name, role)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    ids = tok("1+1=", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, pad_token_id=model.config.eos_token_id if isinstance(
                             model.config.eos_token_id, int) else 0)
    assert out.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("name,role", ROLES, ids=IDS)
def test_config_matches_facts(standin_pair, name, role):
    folder, facts = _folder(standin_pair, name, role), _facts(name, role)
    raw = json.loads((folder / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(folder)
    for key in ("architectures", "model_type", "vocab_size", "tie_word_embeddings", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "rms_norm_eps"):
        assert raw[key] == facts.config[key], key
    # transformers 5 spelling: rope settings live in rope_parameters (rope_theta + rope_type [+ llama3 fields])
    assert raw["rope_parameters"] == facts.config["rope_parameters"]
    assert cfg.rope_parameters == facts.config["rope_parameters"]
    assert "rope_scaling" not in raw and "rope_theta" not in raw
    assert raw["dtype"] == "bfloat16"
    n_heads, n_kv = facts.heads
    assert cfg.num_attention_heads // cfg.num_key_value_heads == n_heads // n_kv
    assert raw["num_hidden_layers"] == 2


@pytest.mark.parametrize("name,role", ROLES, ids=IDS)
def test_lm_head_matches_tying(standin_pair, name, role):
    folder, facts = _folder(standin_pair, name, role), _facts(name, role)
    tensors = _tensor_names(folder)
    vocab = facts.config["vocab_size"]
    assert tensors["model.embed_tokens.weight"][0] == vocab
    if facts.config["tie_word_embeddings"]:
        assert "lm_head.weight" not in tensors  # the real tied checkpoint has no lm_head.weight
    else:
        assert tensors["lm_head.weight"] == tensors["model.embed_tokens.weight"]


@pytest.mark.parametrize("name,role", ROLES, ids=IDS)
def test_generation_config_is_the_real_one(standin_pair, name, role):
    folder, facts = _folder(standin_pair, name, role), _facts(name, role)
    assert json.loads((folder / "generation_config.json").read_text()) == facts.generation_config
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == facts.generation_config["eos_token_id"]
    assert bool(gen.do_sample) == facts.generation_config.get("do_sample", False)


@pytest.mark.parametrize("name,role", ROLES, ids=IDS)
def test_tokenizer_special_tokens_and_template(standin_pair, name, role):
    folder, facts = _folder(standin_pair, name, role), _facts(name, role)
    tok = AutoTokenizer.from_pretrained(folder)
    for text, tid in facts.special_tokens.items():
        assert tok.convert_tokens_to_ids(text) == tid, text
        assert len(BYTE_VOCAB) <= tid < facts.config["vocab_size"]
    assert tok.bos_token == facts.bos_token and tok.eos_token == facts.eos_token
    assert tok.pad_token == facts.pad_token
    plain = tok("ab").input_ids
    if facts.adds_bos:
        assert plain[0] == facts.special_tokens[facts.bos_token] and len(plain) == 3
    else:
        assert len(plain) == 2
    if facts.chat_template is None:
        assert tok.chat_template is None
        return
    assert tok.chat_template == facts.chat_template
    text = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    assert text.endswith({"<|im_end|>": "<|im_start|>assistant\n",
                          "<｜end▁of▁sentence｜>": "<｜Assistant｜><think>\n"}[facts.end_of_turn])
    prompt_ids = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert tok.unk_token_id not in prompt_ids
    full_ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert facts.special_tokens[facts.end_of_turn] in full_ids  # the end-of-turn token at its real id


def test_r1_prompt_ids_are_the_real_ones(standin_pair):
    """R1-Distill-Qwen: BOS 151646 once, <｜User｜> 151644, <｜Assistant｜> 151645, <think> 151648."""
    _, ft = standin_pair("qwen2.5-math-1.5b")
    tok = AutoTokenizer.from_pretrained(ft)
    ids = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids[0] == 151646 and ids.count(151646) == 1
    assert ids[1] == 151644 and ids[-3:-1] == [151645, 151648]
    assert tok.decode(ids[-1:]) == "\n"


@pytest.mark.parametrize("name", list(PAIRS))
def test_fine_tune_descends_from_base(standin_pair, name):
    base_dir, ft_dir = standin_pair(name)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).state_dict()
    assert set(ft) >= {k for k in base if k != "lm_head.weight"}
    for key, w in ft.items():
        src = base.get(key, base["model.embed_tokens.weight"] if key == "lm_head.weight" else None)
        diff = (w - src).abs()
        assert 0 < diff.max() < 0.1, key  # base + small noise (0.01 sigma), never identical
    spec = PAIRS[name]
    if spec.base.config["tie_word_embeddings"] and not spec.ft.config["tie_word_embeddings"]:
        # the untied fine-tune's head starts from the tied base's embedding
        assert (ft["lm_head.weight"] - base["model.embed_tokens.weight"]).abs().max() < 0.1


def test_sharded_folder_has_index_and_loads(standin_pair):
    base, ft = standin_pair("qwen2.5-math-1.5b", shards=True)
    for folder in (base, ft):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all((folder / f).exists() for f in files)
        assert set(index["weight_map"]) == set(_tensor_names(folder))
    assert "lm_head.weight" not in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert AutoModelForCausalLM.from_pretrained(ft).lm_head.weight.shape[0] == 151936


def test_qwen3_structure(standin_pair):
    base, _ = standin_pair("qwen3")
    tensors = _tensor_names(base)
    assert tensors["model.layers.0.self_attn.q_norm.weight"] == (4,)  # per-head q/k RMSNorm, explicit head_dim
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == (16 * 4, 64)
    assert tensors["model.layers.0.self_attn.k_proj.weight"] == (8 * 4, 64)
    # 4,168 bytes: the size of a Qwen3-1.7B chat_template.jinja (see standin_templates.QWEN3)
    assert len(standin_templates.QWEN3.encode()) == 4168


def test_llama_rope_is_llama3_scaling(standin_pair):
    base, _ = standin_pair("llama-3.1-8b")
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.model.rotary_emb.rope_type == "llama3"
