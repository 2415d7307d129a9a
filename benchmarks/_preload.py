"""Imported once by the benchmarks' fork server, so every measured child starts with the heavy
imports already done (a child forked from it is a fresh process that did no work yet)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

for _name in ("transformers.models.qwen2.modeling_qwen2", "acm.checkpoints.tensors", "acm.checkpoints.models",
              "acm.checkpoints.grouping", "acm.merging.engine", "acm.activations.analysis",
              "acm.activations.calibration"):
    try:
        __import__(_name)
    except Exception:  # noqa: BLE001 - a module being written right now must not break the benchmarks
        pass
