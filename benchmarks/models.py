"""Random-weight benchmark models: a base and fine-tuned descendants (base + small noise).

Standard Llama architecture at several sizes, bfloat16 (as real checkpoints ship), written as
sharded safetensors with an index, a config and a small character-level tokenizer. The weights
are written *directly* with safetensors, one shard at a time: every tensor comes from its own
seeded generator, so a fine-tuned tensor is "regenerate the base tensor + noise" and neither
model is ever held in memory whole (the 800M pair would otherwise need several GB).

Cached under ``benchmarks/.cache/models/<size>-<key>/`` where the key hashes everything that
determines the bytes (config, dtype, shard size, noise, seeds, generator version).

    python -m benchmarks.models --sizes 10m 50m          # build (or find) and print paths
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import string
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import CACHE

GENERATOR_VERSION = 1
DEFAULT_SHARD = "200MB"
DEFAULT_NOISE = 0.002      # task-vector scale relative to weights of std 0.02
INIT_STD = 0.02

# ~10M / ~50M / ~200M / ~800M parameters (exact counts: see param_count / the tables).
SIZES: dict[str, dict] = {
    "10m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=16000),
    "50m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=11, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=16000),
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "800m": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=13, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
}
ORDER = list(SIZES)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def parse_size(s: str | int) -> int:
    """'200MB' / '2GB' / 1234 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mult in (("GIB", 1024**3), ("MIB", 1024**2), ("KIB", 1024), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def llama_config(size: str, **overrides):
    from transformers import LlamaConfig

    kw = dict(SIZES[size])
    kw.update(max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              bos_token_id=None, rms_norm_eps=1e-5)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor names and shapes, in module order (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items()]


def param_count(size: str) -> int:
    total = 0
    for _, shape in param_shapes(llama_config(size)):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def make_tokenizer(out_dir: Path | None = None):
    """Character-level fast tokenizer (ids < 128, valid for any vocab size here) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def _tensor_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) * 1_000_003 + seed * 7_919) % (2**63 - 1)


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(_tensor_seed(name, seed))
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, INIT_STD, generator=gen)
    return t


def _tensor(name: str, shape: tuple[int, ...], base_seed: int, ft_seed: int | None, noise: float,
            dtype: torch.dtype, base_name: str | None = None) -> torch.Tensor:
    t = _base_tensor(base_name or name, shape, base_seed)
    if ft_seed is not None:
        gen = torch.Generator().manual_seed(_tensor_seed(name, 10_000 + ft_seed))
        eps = torch.empty(shape, dtype=torch.float32)
        eps.normal_(0.0, noise, generator=gen)
        t.add_(eps)
        del eps
    return t.to(dtype)


def write_model(out_dir: Path, config, *, base_seed: int = 0, ft_seed: int | None = None,
                noise: float = DEFAULT_NOISE, dtype: torch.dtype = torch.bfloat16,
                max_shard_size: str | int = DEFAULT_SHARD, sources: dict[str, str] | None = None) -> Path:
    """Write one model folder shard by shard (peak memory ≈ one shard + one float32 tensor).

    A tied config gets no head tensor (as real tied checkpoints). ``sources`` maps a tensor name to
    the name whose base values it starts from (an untied fine-tune of a tied base: its
    ``lm_head.weight`` starts from the base's embedding)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    limit = parse_size(max_shard_size)
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = param_shapes(config)
    if getattr(config, "tie_word_embeddings", False):
        shapes = [(n, s) for n, s in shapes if n != "lm_head.weight"]
    sources = sources or {}
    # assign tensors to shards up front (so file names can carry the shard count)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    cur = 0
    for name, shape in shapes:
        n = elem
        for d in shape:
            n *= d
        if shards[-1] and cur + n > limit:
            shards.append([])
            cur = 0
        shards[-1].append((name, shape))
        cur += n
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, members in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        tensors = {}
        for name, shape in members:
            tensors[name] = _tensor(name, shape, base_seed, ft_seed, noise, dtype, base_name=sources.get(name))
            weight_map[name] = fname
            total_size += tensors[name].numel() * elem
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if total > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    make_tokenizer(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class ModelSet:
    """A cached base + fine-tuned models of one size."""

    size: str
    base: Path
    fts: list[Path]
    params: int
    bytes_per_model: int
    config: dict

    def to_dict(self) -> dict:
        return {"size": self.size, "base": str(self.base), "fts": [str(f) for f in self.fts],
                "params": self.params, "bytes_per_model": self.bytes_per_model}


def cache_key(size: str, *, noise: float, max_shard_size: str | int, dtype: str) -> str:
    spec = {"v": GENERATOR_VERSION, "config": SIZES[size], "noise": noise, "shard": str(max_shard_size),
            "dtype": dtype, "init_std": INIT_STD}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def get_models(size: str, *, n_ft: int = 1, noise: float = DEFAULT_NOISE, max_shard_size: str | int = DEFAULT_SHARD,
               cache: Path | None = None, verbose: bool = True) -> ModelSet:
    """Build (once) and return the base + ``n_ft`` fine-tuned models of ``size``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    root = Path(cache or CACHE) / "models" / f"{size}-{cache_key(size, noise=noise, max_shard_size=max_shard_size, dtype='bf16')}"
    config = llama_config(size)
    folders = [root / "base"] + [root / f"ft{i + 1}" for i in range(n_ft)]
    for i, folder in enumerate(folders):
        if (folder / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        write_model(folder, llama_config(size), base_seed=0, ft_seed=None if i == 0 else i, noise=noise,
                    max_shard_size=max_shard_size)
        if verbose:
            print(f"[models] wrote {folder} in {time.perf_counter() - t0:.1f}s", flush=True)
    params = sum(_numel(s) for _, s in param_shapes(config))
    nbytes = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))
    return ModelSet(size=size, base=folders[0], fts=folders[1:], params=params, bytes_per_model=nbytes,
                    config=SIZES[size])


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["10m"], choices=ORDER)
    ap.add_argument("--n-ft", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smallest size only")
    args = ap.parse_args(argv)
    sizes = ["10m"] if args.quick else args.sizes
    for size in sizes:
        ms = get_models(size, n_ft=args.n_ft)
        print(json.dumps(ms.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
