"""Tiny random models and tokenizers for tests: real HF folders (safetensors + config + tokenizer).

They are built on the fly into a temp dir so the tests need no network and no bundled weights,
and are small enough (a few thousand parameters) that every test runs in milliseconds.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
ALPHABET = list(string.ascii_lowercase + string.digits + " .,?!:+-=*\n")


def make_tokenizer(out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with a chat template (vocab < 64)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET)


def tiny_config(family: str = "llama", *, vocab_size: int = VOCAB_SIZE, **overrides) -> PretrainedConfig:
    """A config of the given family with 2 layers and hidden size 16 unless overridden."""
    common = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if family == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=128, **common)
        kw.update(overrides)
        return GPT2Config(**kw)
    kw = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
              tie_word_embeddings=False, **common)
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    if family == "qwen3":
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    return cls(**kw)


def make_tiny_model(out_dir: Path, family: str = "llama", *, seed: int = 0, init_from: Path | None = None,
                    noise: float = 0.02, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                    vocab_size: int = VOCAB_SIZE, **overrides) -> Path:
    """Save a tiny random causal LM (+ tokenizer) to ``out_dir`` and return the path.

    With ``init_from`` the new model starts from that model's weights plus Gaussian noise of
    scale ``noise`` — a stand-in for "fine-tuned from that base" with a real task vector.
    """
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    if init_from is not None:
        src = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        src_state = src.state_dict()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                base = src_state[name]
                rows = min(base.shape[0], p.shape[0]) if p.dim() > 0 else None
                if p.shape == base.shape:
                    p.copy_(base + noise * torch.randn(p.shape, generator=gen))
                elif rows is not None and p.shape[1:] == base.shape[1:]:  # grown vocabulary
                    p[:rows].copy_(base[:rows] + noise * torch.randn(base[:rows].shape, generator=gen))
    model = model.to(dtype)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    make_tokenizer(out_dir)
    return out_dir


def make_pair(tmp_path: Path, family: str = "llama", *, n_ft: int = 1, **overrides) -> tuple[Path, list[Path]]:
    """A base model and ``n_ft`` fine-tuned descendants of it."""
    base = make_tiny_model(tmp_path / f"{family}-base", family, seed=0, **overrides)
    fts = [make_tiny_model(tmp_path / f"{family}-ft{i}", family, seed=i + 1, init_from=base, **overrides)
           for i in range(n_ft)]
    return base, fts


def write_calibration(path: Path, n: int = 24) -> Path:
    """A small jsonl calibration file with a ``text`` field."""
    import json

    lines = [json.dumps({"text": f"what is {i} plus {i * 3}? the answer is {i * 4}."}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def uploads_from_pytest_tmp(tmp_path_factory):
    """The app's handlers read uploads only from Gradio's upload area; here pytest's temp dirs stand in for it.
    Import it into an app test module (module-scoped, autouse there)."""
    from components import common

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(common.UPLOAD_ROOTS_ENV, str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared 2-core machine two OpenMP threads stall each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def group_rows(model, inp: torch.Tensor, mask: torch.Tensor, head_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer group's activations for the real (unpadded) tokens of one batch, the direct way:
    hooks on the embedding and each block, then the logits at ``head_ids`` — ``[tokens, features]``
    per group, the reference the analysis' estimators are checked against."""
    from acm.checkpoints.grouping import find_group_modules

    mods = find_group_modules(model)
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for m in [mods.embed, *mods.blocks]]
    try:
        with torch.inference_mode():
            logits = model(input_ids=inp, attention_mask=mask, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    real = mask.reshape(-1).bool()
    return [o.reshape(-1, o.shape[-1])[real] for o in outs] + [logits.reshape(-1, logits.shape[-1])[real][:, head_ids]]


# ----------------------------------------------------------------------------- loopback Hub
HUB_BASE = "acm-test/tiny-base"        # one model.safetensors
HUB_FT = "acm-test/tiny-ft"            # sharded (index + shards) on "main"; another fine-tune on branch "v2"
HUB_GATED = "acm-test/tiny-gated"      # every file answers 401 GatedRepo
HUB_MISSING = "acm-test/no-such-model"  # 404 RepoNotFound
HUB_DATASET = "acm-test/tiny-calib"    # data/train-00000-of-00001.parquet with a "text" column
# Wide enough that each weight file is several times the 100 kB a safetensors header read asks for.
HUB_MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def hub_folders(tmp_path_factory) -> dict[str, Path]:
    """The local folders the loopback Hub publishes (built once per session)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hub-src")
    base = make_tiny_model(root / "base", "qwen2", seed=0, **HUB_MODEL_SHAPE)
    ft = make_tiny_model(root / "ft", "qwen2", seed=1, init_from=base, max_shard_size="600KB", **HUB_MODEL_SHAPE)
    ft2 = make_tiny_model(root / "ft2", "qwen2", seed=2, init_from=base, **HUB_MODEL_SHAPE)
    data = root / "calib"
    (data / "data").mkdir(parents=True)
    texts = [f"what is {i} plus {i * 3}? the answer is {i * 4}." for i in range(24)]
    pq.write_table(pa.table({"text": texts, "id": list(range(24))}), data / "data" / "train-00000-of-00001.parquet")
    (data / "README.md").write_text("---\nlicense: mit\n---\n# tiny calibration set for tests\n")
    return {"base": base, "ft": ft, "ft_v2": ft2, "calibration": data}


@pytest.fixture
def loopback_hub(hub_folders, tmp_path, monkeypatch):
    """A started ``tests.hub_server.LoopbackHub`` serving ``HUB_BASE``, ``HUB_FT`` (+ branch "v2"),
    ``HUB_GATED`` and the dataset ``HUB_DATASET``; ``huggingface_hub``/``datasets`` in this process
    point at it, online, with an empty cache at ``hub.home`` (under ``tmp_path``). ``hub.env(hub.home)``
    gives the same for a subprocess. Stopped (and every patch undone) after the test.

    ``hub.commits`` maps ``(repo_id, branch)`` to the commit sha. Counters start at zero.
    """
    from tests.hub_server import LoopbackHub, point_clients_at

    hub = LoopbackHub().start()
    hub.commits = {(HUB_BASE, "main"): hub.add_model(HUB_BASE, hub_folders["base"]),
                   (HUB_FT, "main"): hub.add_model(HUB_FT, hub_folders["ft"]),
                   (HUB_FT, "v2"): hub.add_model(HUB_FT, hub_folders["ft_v2"], branch="v2"),
                   (HUB_GATED, "main"): hub.add_model(HUB_GATED, hub_folders["base"], gated=True),
                   (HUB_DATASET, "main"): hub.add_dataset(HUB_DATASET, hub_folders["calibration"])}
    point_clients_at(hub, monkeypatch, tmp_path / "hf-home")
    try:
        yield hub
    finally:
        hub.stop()
