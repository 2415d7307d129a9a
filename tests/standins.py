"""Shape-faithful tiny stand-ins of the real (base, fine-tuned) model pairs people merge.

Each stand-in is a real HF folder (bf16 safetensors, optionally sharded with an index, config.json,
generation_config.json, tokenizer files with the real chat template) built in a second or two. Only the
hidden size, the MLP size, the layer count and the per-head size are shrunk; everything a merge tool can
trip over is kept as in the real checkpoint:

- the real ``vocab_size`` (151,936 / 152,064 / 128,256), so embeddings and ``lm_head`` have the real row count;
- the real ``tie_word_embeddings`` (a tied base has NO ``lm_head.weight`` in its safetensors, its untied
  fine-tune has one, initialised from the base embedding plus noise);
- the real ``model_type`` / ``architectures``, the real number of query and key/value heads (GQA 12:2, 28:4,
  32:8, 16:8) with a tiny ``head_dim``, Qwen3's q_norm/k_norm and explicit ``head_dim``;
- the real RoPE settings, written the way transformers 5 spells them (``rope_parameters`` with
  ``rope_theta``/``rope_type`` and, for Llama 3.1, ``factor``/``low_freq_factor``/``high_freq_factor``/
  ``original_max_position_embeddings``), and the real ``max_position_embeddings``;
- the real bos/eos/pad ids in config.json and the real generation_config.json (sampling settings included);
- a byte-level tokenizer (the 256 byte symbols, no merges) whose special tokens sit at their real ids, with the
  real bos/eos/pad tokens, tokenizer_class, "adds a BOS" behaviour and chat template. The
  fine-tuned model keeps its own tokenizer: DeepSeek's R1 distills ship different special tokens and another
  template on the same vocabulary as their Qwen / Llama base.

Every value is either read from a source named in the comment above its facts dict, or marked ``UNVERIFIED``
there and listed in ``ModelFacts.unverified`` (don't build a test on those as if they were the real thing).

Usage::

    from tests.standins import PAIRS, build_pair, standin_pair  # noqa: F401  (standin_pair is a fixture)

    base, ft = build_pair("qwen2.5-math-1.5b", tmp_path)             # fresh pair
    def test_x(standin_pair):
        base, ft = standin_pair("llama-3.1-8b", shards=True)       # built once per test session
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from tests import standin_templates as templates

# ----------------------------------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a stand-in reproduces of one real checkpoint."""

    repo: str                     # the real Hugging Face repo id
    family: str                   # "qwen2" | "llama" | "qwen3": which transformers config class
    config: dict                  # real config.json values (besides the shrunk sizes), transformers-5 spelling
    generation_config: dict       # the real generation_config.json (minus transformers_version)
    special_tokens: dict          # token text -> real id
    non_special: frozenset = frozenset()   # added tokens the real tokenizer.json marks "special": false
    bos_token: str | None = None  # tokenizer_config bos/eos/pad
    eos_token: str | None = None
    pad_token: str | None = None
    adds_bos: bool = False        # the real tokenizer prepends bos_token when encoding plain text
    chat_template: str | None = None
    tokenizer_config: dict = field(default_factory=dict)  # real tokenizer_config.json keys we copy
    end_of_turn: str | None = None  # the token that ends an assistant turn in the chat template
    unverified: frozenset = frozenset()  # keys above (or "tokens:<text>") not read from a source
    sources: tuple = ()

    @property
    def heads(self) -> tuple[int, int]:
        return self.config["num_attention_heads"], self.config["num_key_value_heads"]


@dataclass(frozen=True)
class PairSpec:
    name: str
    base: ModelFacts
    ft: ModelFacts
    notes: str = ""
    extra: dict = field(default_factory=dict)


# --- Qwen2.5-Math-1.5B --------------------------------------------------------------------------------------
# config: max_position_embeddings 4096 and rope_theta 10000 — NVIDIA-NeMo/Skills docs (find_string id
#   2078306435: `sed 's/"max_position_embeddings": 4096,/…/' Qwen2.5-Math-1.5B/config.json`, same for
#   `"rope_theta": 10000,`), GAIR-NLP/ToRL issue #23 ("in /Qwen/Qwen2.5-Math-1.5B's config,
#   "max_position_embeddings": 4096"). 12:2 heads, vocab 151936, tied — Qwen2.5-1.5B family (id 71463455676
#   QWEN2_5_1_5B dict: 12/2 heads, tie True, vocab 151936); tie also consistent with ZHUI/paddlenlp_model_readme
#   Qwen/Qwen2.5-Math-1.5B/index.md listing ONE model.safetensors of 2.9 GB (1.54e9 bf16 params, no lm_head).
# bos/eos 151643 and generation_config: Qwen2.5 base generation_config {bos 151643, do_sample false, eos 151643,
#   max_new_tokens 2048} (logs id 54039783680 / 56025705611); its size, 138 bytes with transformers_version
#   "4.37.0", equals the 138.0 B the paddlenlp index lists for Qwen2.5-Math-1.5B/generation_config.json.
#   Config bos/eos = 151643: UNVERIFIED for -Math itself (read for Qwen2.5 base and for the R1 distill of it).
QWEN25_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN25_MATH_1_5B = ModelFacts(
    repo="Qwen/Qwen2.5-Math-1.5B",
    family="qwen2",
    config=dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, tie_word_embeddings=True,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
    ),
    generation_config={"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048},
    special_tokens=QWEN25_SPECIALS,
    eos_token="<|endoftext|>", pad_token="<|endoftext|>", adds_bos=False,
    chat_template=templates.QWEN25_MATH, end_of_turn="<|im_end|>",
    tokenizer_config={"tokenizer_class": "Qwen2Tokenizer"},
    unverified=frozenset({"bos_token_id", "eos_token_id", "eos_token", "pad_token", "chat_template",
                          "generation_config", "tokenizer_config"}),
    sources=("find_string 2078306435 (NeMo-Skills docs)", "GAIR-NLP/ToRL#23",
             "ZHUI/paddlenlp_model_readme Qwen/Qwen2.5-Math-1.5B/index.md"),
)

# --- DeepSeek-R1-Distill-Qwen-1.5B ----------------------------------------------------------------------------
# config: Captainphiora/qwen-ascend-llm models/DeepSeek-R1-Distill-Qwen-1.5B/config.json (a local copy: bos
#   151643, eos 151643, max_position_embeddings 131072, rope_theta 10000, 12/2 heads, tie false, vocab 151936);
#   the same values in a printed Qwen2Config of "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" (find_string id 810375405).
# tokens: tokenizer.json added_tokens quoted with "Ref: huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/
#   blob/main/tokenizer_config.json" (find_string id 67463328913; also id 17546530812): 151643
#   <｜end▁of▁sentence｜> (special), 151644 <｜User｜>, 151645 <｜Assistant｜>, 151646 <｜begin▁of▁sentence｜>
#   (special), 151647 <|EOT|>, 151648 <think>, 151649 </think> (the last five "special": false).
# tokenizer_config: bos <｜begin▁of▁sentence｜>, eos/pad <｜end▁of▁sentence｜>, add_bos_token true — HF API dumps for
#   R1-Distill-Qwen-32B / -Llama-8B (alain-ai-learning-platform, see standin_templates.py) and the full R1-series
#   tokenizer_config quoted at find_string id 12968254652.
# generation_config {bos 151646, do_sample true, eos 151643, temperature 0.6, top_p 0.95}: read for
#   DeepSeek-R1-Distill-Qwen-32B-Japanese (find_string id 68871670255); UNVERIFIED for -1.5B itself.
R1_QWEN_SPECIALS = {
    "<｜end▁of▁sentence｜>": 151643, "<｜User｜>": 151644, "<｜Assistant｜>": 151645,
    "<｜begin▁of▁sentence｜>": 151646, "<|EOT|>": 151647, "<think>": 151648, "</think>": 151649,
}
R1_QWEN_NON_SPECIAL = frozenset({"<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<think>", "</think>"})
# R1-series tokenizer_config.json keys (find_string id 12968254652 quotes the whole file; the staging log at
# find_string id 55485042495 had to patch R1-Distill-Llama-8B's declared tokenizer_class).
R1_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
                       "legacy": True, "model_max_length": 16384}
R1_QWEN_GENERATION = {"bos_token_id": 151646, "do_sample": True, "eos_token_id": 151643,
                      "temperature": 0.6, "top_p": 0.95}
R1_DISTILL_QWEN_1_5B = ModelFacts(
    repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    family="qwen2",
    config=dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, tie_word_embeddings=False,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
    ),
    generation_config=R1_QWEN_GENERATION,
    special_tokens=R1_QWEN_SPECIALS, non_special=R1_QWEN_NON_SPECIAL,
    bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
    adds_bos=True, chat_template=templates.R1_DISTILL, end_of_turn="<｜end▁of▁sentence｜>",
    tokenizer_config=R1_TOKENIZER_CONFIG,
    unverified=frozenset({"generation_config"}),
    sources=("Captainphiora/qwen-ascend-llm models/DeepSeek-R1-Distill-Qwen-1.5B/config.json",
             "find_string 810375405", "find_string 67463328913", "find_string 68871670255"),
)

# --- Qwen2.5-Math-7B ------------------------------------------------------------------------------------------
# 28:4 heads, vocab 152064, untied: Qwen2.5-7B family (id 71463455676 QWEN2_5_7B dict; QwenLM/Qwen3-Coder#124
#   quotes a 7B Qwen2.5 config with 28/4, tie false, vocab 152064). max_position_embeddings 4096 /
#   rope_theta 10000: huggingface/open-r1#469 ("max_position_embeddings of Qwen2.5-Math-7B-Instruct is 4096, and
#   rope_theta is 10000.0") and NVIDIA-NeMo/Skills#468 ("the original model [Qwen2.5-Math-7B] has a very limited
#   context window (4096 tokens)"). The paddlenlp index lists 4 shards for Qwen2.5-Math-7B (sharded checkpoint).
# bos/eos 151643, generation_config: as Qwen2.5-Math-1.5B (the paddlenlp index lists the same 138-byte
#   generation_config.json for -7B); UNVERIFIED beyond that.
QWEN25_MATH_7B = ModelFacts(
    repo="Qwen/Qwen2.5-Math-7B",
    family="qwen2",
    config=dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, tie_word_embeddings=False,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
    ),
    generation_config={"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048},
    special_tokens=QWEN25_SPECIALS,
    eos_token="<|endoftext|>", pad_token="<|endoftext|>", adds_bos=False,
    chat_template=templates.QWEN25_MATH, end_of_turn="<|im_end|>",
    tokenizer_config={"tokenizer_class": "Qwen2Tokenizer"},
    unverified=frozenset({"bos_token_id", "eos_token_id", "eos_token", "pad_token", "chat_template",
                          "generation_config", "tokenizer_config"}),
    sources=("huggingface/open-r1#469", "NVIDIA-NeMo/Skills#468", "find_string 71463455676",
             "ZHUI/paddlenlp_model_readme Qwen/Qwen2.5-Math-7B/index.md"),
)

# --- DeepSeek-R1-Distill-Qwen-7B ------------------------------------------------------------------------------
# config: a config.json used with model_name="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" (find_string id
#   44452669929): bos/eos 151643, hidden 3584, max_position_embeddings 131072, 28/4 heads, rope_theta 10000,
#   tie false, vocab 152064, transformers 4.44.0. Tokens / tokenizer_config / template: as -1.5B (same release);
#   the token ids are UNVERIFIED for -7B itself (read for -1.5B).
R1_DISTILL_QWEN_7B = ModelFacts(
    repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    family="qwen2",
    config=dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, tie_word_embeddings=False,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
    ),
    generation_config=R1_QWEN_GENERATION,
    special_tokens=R1_QWEN_SPECIALS, non_special=R1_QWEN_NON_SPECIAL,
    bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
    adds_bos=True, chat_template=templates.R1_DISTILL, end_of_turn="<｜end▁of▁sentence｜>",
    tokenizer_config=R1_TOKENIZER_CONFIG,
    unverified=frozenset({"generation_config", "special_tokens"}),
    sources=("find_string 44452669929",),
)

# --- Llama-3.1-8B ---------------------------------------------------------------------------------------------
# config: the `llama_3_1_config` dict at find_string id 20086630943 (transformers 4.43.0.dev0: bos 128000,
#   eos 128001, 32/8 heads, max_position_embeddings 131072, rms_norm_eps 1e-5, rope_theta 500000,
#   rope_scaling {factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192,
#   rope_type llama3}, tie false, vocab 128256); the same rope block and eos list [128001, 128008, 128009] for the
#   -Instruct config at id 59178817283 — the several-eos list belongs to -Instruct, the base config has 128001.
# tokens: <|begin_of_text|> / <|end_of_text|> are the bos/eos of the Llama 3.x base tokenizer_config (HF API dump
#   of meta-llama/Llama-3.2-1B, alain-ai-learning-platform out/research-meta-llama-llama-3-2-1b/…/model.json),
#   at the config's bos/eos ids 128000 / 128001. That dump has NO chat_template for the base model; the
#   Llama-3.1-8B base tokenizer_config itself was not read: "no chat template" is UNVERIFIED for 3.1-8B.
# generation_config {bos 128000, do_sample true, eos 128001, temperature 0.6, top_p 0.9}: read for
#   meta-llama/Llama-3.2-1B (log at find_string id 3036918142); UNVERIFIED for Llama-3.1-8B.
# adds_bos: the Llama 3 tokenizer.json post-processor prepends <|begin_of_text|>; UNVERIFIED (not read).
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA_3_1_8B = ModelFacts(
    repo="meta-llama/Llama-3.1-8B",
    family="llama",
    config=dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, tie_word_embeddings=False,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA31_ROPE), rms_norm_eps=1e-5, hidden_act="silu", mlp_bias=False,
        attention_bias=False, bos_token_id=128000, eos_token_id=128001,
    ),
    generation_config={"bos_token_id": 128000, "do_sample": True, "eos_token_id": 128001,
                       "temperature": 0.6, "top_p": 0.9},
    special_tokens={"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001},
    bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", adds_bos=True,
    chat_template=None, end_of_turn=None,
    unverified=frozenset({"generation_config", "chat_template", "adds_bos"}),
    sources=("find_string 20086630943", "find_string 59178817283",
             "daniel-p-green/alain-ai-learning-platform "
             "out/research-meta-llama-llama-3-2-1b/sources/huggingface/model.json",
             "find_string 3036918142"),
)

# --- DeepSeek-R1-Distill-Llama-8B -----------------------------------------------------------------------------
# generation_config: ds28-ops/deepseek-distill-sft model-checkpoint/generation_config.json, a fine-tune of
#   deepseek-ai/DeepSeek-R1-Distill-Llama-8B that kept it: {"_from_model_config": true, bos 128000, do_sample
#   true, eos 128001, temperature 0.6, top_p 0.95}. "_from_model_config" => config.json bos/eos = 128000/128001.
# tokenizer_config (bos <｜begin▁of▁sentence｜>, eos/pad <｜end▁of▁sentence｜>, chat template), LlamaForCausalLM,
#   BF16 params 8,030,261,248 (= Llama-3.1-8B untied, vocab 128256): HF API dump, alain-ai-learning-platform
#   out/research-deepseek-ai-deepseek-r1-distill-llama-8b/sources/huggingface/model.json.
# config.json itself was NOT read: heads, rope block and max_position_embeddings are taken from its base
#   Llama-3.1-8B (UNVERIFIED for the distill; the capsule README there says "Context window: 131072").
# Ids of <｜User｜> / <｜Assistant｜> / <think> / </think>: NOT found in any source. They are placed at
#   128011-128014 (Llama-3 reserved-token slots) from memory — UNVERIFIED; tests do not pin them.
R1_DISTILL_LLAMA_8B = ModelFacts(
    repo="deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    family="llama",
    config=dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, tie_word_embeddings=False,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA31_ROPE), rms_norm_eps=1e-5, hidden_act="silu", mlp_bias=False,
        attention_bias=False, bos_token_id=128000, eos_token_id=128001,
    ),
    generation_config={"bos_token_id": 128000, "do_sample": True, "eos_token_id": 128001,
                       "temperature": 0.6, "top_p": 0.95},
    special_tokens={"<｜begin▁of▁sentence｜>": 128000, "<｜end▁of▁sentence｜>": 128001,
                    "<｜User｜>": 128011, "<｜Assistant｜>": 128012, "<think>": 128013, "</think>": 128014},
    non_special=frozenset({"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"}),
    bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
    adds_bos=True, chat_template=templates.R1_DISTILL, end_of_turn="<｜end▁of▁sentence｜>",
    tokenizer_config=R1_TOKENIZER_CONFIG,
    unverified=frozenset({"rope_parameters", "max_position_embeddings", "num_attention_heads",
                          "num_key_value_heads", "rms_norm_eps", "tokens:<｜User｜>", "tokens:<｜Assistant｜>",
                          "tokens:<think>", "tokens:</think>", "non_special"}),
    sources=("ds28-ops/deepseek-distill-sft model-checkpoint/generation_config.json",
             "daniel-p-green/alain-ai-learning-platform "
             "out/research-deepseek-ai-deepseek-r1-distill-llama-8b/sources/huggingface/model.json"),
)

# --- Qwen3-1.7B-Base ↔ Qwen3-1.7B -----------------------------------------------------------------------------
# Qwen3-1.7B config: mephisto1484/Neko-LoRA-Build-Your-AI-Catgirl Qwen3-1.7B/config.json (re-saved copy) and the
#   config.json of a Qwen3-1.7B derivative in STUDENT_AUDIT.md (find_string id 70262832084): Qwen3ForCausalLM,
#   bos 151643, eos 151645, head_dim 128, 16/8 heads, max_position_embeddings 40960, rope_theta 1000000,
#   tie true, vocab 151936, rms_norm_eps 1e-6, attention_bias false.
# Qwen3-1.7B generation_config {bos 151643, do_sample true, eos [151645, 151643], pad 151643, temperature 0.6,
#   top_k 20, top_p 0.95} and added tokens 151643..151668 (<|endoftext|>, <|im_start|>, <|im_end|>, …,
#   <think> 151667, </think> 151668), tokenizer_config eos <|im_end|>, pad <|endoftext|>, bos null: same audit.
# Qwen3-1.7B-Base: tied (a megakernel loader maps lm_head.weight -> model.embed_tokens.weight for the -Base
#   snapshot, find_string id 70395053448; single model.safetensors), same sizes there (HID 2048, VOCAB 151936,
#   q rows 2048 = 16 x 128, kv rows 1024 = 8 x 128); native EOS 151643 and bos token <|endoftext|> for -Base
#   (find_string ids 68328612320, 71482755020). -Base max_position_embeddings 32768, its generation_config and
#   its chat template: UNVERIFIED (not read).
QWEN3_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<think>": 151667, "</think>": 151668}
QWEN3_1_7B = ModelFacts(
    repo="Qwen/Qwen3-1.7B",
    family="qwen3",
    config=dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, tie_word_embeddings=True,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=40960,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, rms_norm_eps=1e-6, hidden_act="silu",
        attention_bias=False, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
    ),
    generation_config={"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                       "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
    special_tokens=QWEN3_SPECIALS, non_special=frozenset({"<think>", "</think>"}),
    eos_token="<|im_end|>", pad_token="<|endoftext|>", adds_bos=False,
    chat_template=templates.QWEN3, end_of_turn="<|im_end|>",
    tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072},
    unverified=frozenset({"non_special"}),
    sources=("mephisto1484/Neko-LoRA-Build-Your-AI-Catgirl Qwen3-1.7B/config.json", "find_string 70262832084"),
)
QWEN3_1_7B_BASE = ModelFacts(
    repo="Qwen/Qwen3-1.7B-Base",
    family="qwen3",
    config=dict(QWEN3_1_7B.config, eos_token_id=151643, max_position_embeddings=32768),
    generation_config={"bos_token_id": 151643, "eos_token_id": 151643},
    special_tokens=QWEN3_SPECIALS, non_special=frozenset({"<think>", "</think>"}),
    eos_token="<|endoftext|>", pad_token="<|endoftext|>", adds_bos=False,
    chat_template=templates.QWEN3, end_of_turn="<|im_end|>",
    tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072},
    unverified=frozenset({"max_position_embeddings", "generation_config", "chat_template", "eos_token",
                          "non_special"}),
    sources=("find_string 70395053448", "find_string 68328612320", "find_string 71482755020"),
)

PAIRS: dict[str, PairSpec] = {
    "qwen2.5-math-1.5b": PairSpec(
        "qwen2.5-math-1.5b", QWEN25_MATH_1_5B, R1_DISTILL_QWEN_1_5B,
        notes="tied base (no lm_head.weight) vs untied fine-tune; R1 tokens/template on the same vocabulary"),
    "qwen2.5-math-7b": PairSpec(
        "qwen2.5-math-7b", QWEN25_MATH_7B, R1_DISTILL_QWEN_7B,
        notes="both untied, vocab 152064, GQA 28:4"),
    "llama-3.1-8b": PairSpec(
        "llama-3.1-8b", LLAMA_3_1_8B, R1_DISTILL_LLAMA_8B,
        notes="llama3 rope scaling, vocab 128256, GQA 32:8; base has no chat template"),
    "qwen3": PairSpec(
        "qwen3", QWEN3_1_7B_BASE, QWEN3_1_7B,
        notes="Qwen3-1.7B-Base -> Qwen3-1.7B: q_norm/k_norm, explicit head_dim, both tied, GQA 16:8"),
}

# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------

# Ordinary vocabulary of the stand-in tokenizers: the 256 byte-level characters (GPT-2 / Qwen / Llama-3 style
# byte-to-unicode map) at ids 0..255 and no merges, i.e. a byte-level BPE that spells every text byte by byte.
# It is byte-level like the real Qwen and Llama-3 tokenizers, so transformers' own tokenizer classes
# (Qwen2Tokenizer rebuilds the pre-tokenizer from the model type) encode and decode it correctly.
BYTE_VOCAB = list(pre_tokenizers.ByteLevel.alphabet())

_CONFIG_CLASSES = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}


def make_config(facts: ModelFacts, *, hidden: int | None = None, layers: int = 2, head_dim: int = 4):
    """The real config with only hidden / intermediate size, layer count and head size shrunk.

    The real numbers of query and key/value heads are kept. For Qwen2 / Llama (no head_dim in the real
    config) the hidden size defaults to ``num_attention_heads * head_dim`` so head_dim follows from the sizes as in
    the real config (transformers 5 writes ``head_dim`` into a Llama config.json anyway); Qwen3 has an explicit
    ``head_dim`` in its config and takes ``hidden`` (default 64) freely.
    """
    n_heads = facts.config["num_attention_heads"]
    kw = {k: v for k, v in facts.config.items() if k != "architectures"}
    if facts.family == "qwen3":
        hidden = 64 if hidden is None else hidden
        kw["head_dim"] = head_dim
    else:
        hidden = n_heads * head_dim if hidden is None else hidden
        if hidden % n_heads:
            raise ValueError(f"hidden={hidden} is not a multiple of the {n_heads} attention heads of {facts.repo}")
    kw.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    if facts.family in ("qwen2", "qwen3"):
        kw["max_window_layers"] = layers  # a layer count (real: 21 of 28 / 28 of 28); unused without sliding window
    config = _CONFIG_CLASSES[facts.family](**kw)
    config.architectures = list(facts.config["architectures"])
    return config


def make_standin_tokenizer(facts: ModelFacts, out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with the real special tokens at their real ids and the real chat template.

    Saved with the real ``tokenizer_class`` (and ``add_bos_token`` where the real one sets it), so that
    ``AutoTokenizer`` takes the same code path as for the real checkpoint.
    """
    vocab = {ch: i for i, ch in enumerate(sorted(BYTE_VOCAB))}
    vocab.update(facts.special_tokens)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
        AddedToken(text, special=text not in facts.non_special, normalized=False)
        for text in facts.special_tokens
    ])
    if facts.adds_bos:
        bos = facts.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, facts.special_tokens[bos])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=facts.bos_token, eos_token=facts.eos_token,
        pad_token=facts.pad_token,
    )
    if facts.chat_template is not None:
        tok.chat_template = facts.chat_template
    if out_dir is not None:
        tok.save_pretrained(out_dir)
        path = Path(out_dir) / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(facts.tokenizer_config)
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok


def _save(model, facts: ModelFacts, out_dir: Path, shards: bool) -> Path:
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": "4MB"} if shards else {}
    model.save_pretrained(out_dir, **kwargs)
    # The real generation_config.json, not the one derived from config.json by save_pretrained.
    (out_dir / "generation_config.json").write_text(json.dumps(facts.generation_config, indent=2) + "\n")
    make_standin_tokenizer(facts, out_dir)
    return out_dir


def build_pair(name: str, tmp_path: Path, *, shards: bool = False, hidden: int | None = None, layers: int = 2,
               head_dim: int = 4, seed: int = 0, noise: float = 0.01) -> tuple[Path, Path]:
    """Build the base and fine-tuned stand-ins of ``PAIRS[name]`` under ``tmp_path``; return their folders.

    The fine-tuned weights are the base weights plus Gaussian noise of scale ``noise`` (a real task vector);
    when the base ties its output embedding and the fine-tune does not, the fine-tune's ``lm_head.weight``
    starts from the base embedding plus noise. Weights are saved in bf16 (the real dtype); ``shards=True``
    saves with a small max_shard_size so ``model.safetensors.index.json`` exists, as in the real checkpoints.
    """
    spec = PAIRS[name]
    tmp_path = Path(tmp_path)
    base_cfg = make_config(spec.base, hidden=hidden, layers=layers, head_dim=head_dim)
    ft_cfg = make_config(spec.ft, hidden=hidden, layers=layers, head_dim=head_dim)

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(base_cfg)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ft = AutoModelForCausalLM.from_config(ft_cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in ft.named_parameters():
            src = base_state.get(pname)
            if src is None and pname == "lm_head.weight":  # tied base -> untied fine-tune
                src = base_state["model.embed_tokens.weight"]
            if src is None or src.shape != p.shape:
                raise RuntimeError(f"{name}: no base tensor for {pname} {tuple(p.shape)}")
            p.copy_(src + noise * torch.randn(p.shape, generator=gen))

    base_dir = _save(base.to(torch.bfloat16), spec.base, tmp_path / f"{name}-base", shards)
    ft_dir = _save(ft.to(torch.bfloat16), spec.ft, tmp_path / f"{name}-ft", shards)
    return base_dir, ft_dir


@pytest.fixture(scope="session")
def standin_pair(tmp_path_factory):
    """Factory fixture: ``standin_pair(name, **build_pair_kwargs) -> (base, ft)``, built once per session.

    The folders are shared by every test of the session: treat them as read-only.
    """
    cache: dict = {}

    def get(name: str, **kwargs) -> tuple[Path, Path]:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_pair(name, tmp_path_factory.mktemp(name.replace(".", "_")), **kwargs)
        return cache[key]

    return get
