"""Full-size random-weight stand-ins of the paper's 1.5B Long-to-Short pair, built once, cached
outside the repo.

Shape of Qwen2.5-Math-1.5B / DeepSeek-R1-Distill-Qwen-1.5B (Qwen2ForCausalLM: 28 layers, hidden
1536, MLP 8960, 12 query / 2 key-value heads, vocabulary 151,936, bfloat16, shards of ≤ 2 GB):
the base is **tied** (no ``lm_head.weight``, ``tie_word_embeddings: true``) and the fine-tuned
model **untied** (its own ``lm_head.weight``, starting from the base's embedding + noise), as in
the real pair. Weights are random (seeded), so speed and memory are real and accuracy is not.

    python -m benchmarks.fullsize            # build (or find) the pair and print its paths

Cache: ``$ACM_FULLSIZE_CACHE`` or ``~/.cache/acm-merge-explorer/fullsize`` (about 6.2 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from benchmarks.models import DEFAULT_NOISE, ModelSet, _numel, param_shapes, write_model

GENERATOR_VERSION = 1
SHARD = "2GB"
# Qwen2.5-Math-1.5B's config.json (hidden/intermediate/layers/heads/vocab/rope as published).
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643)
SHAPES = {"qwen2.5-1.5b": QWEN25_15B}


def cache_root() -> Path:
    return Path(os.environ.get("ACM_FULLSIZE_CACHE", Path.home() / ".cache" / "acm-merge-explorer" / "fullsize"))


def qwen2_config(shape: str, *, tied: bool):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=tied, use_sliding_window=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def get_pair(shape: str = "qwen2.5-1.5b", *, noise: float = DEFAULT_NOISE, verbose: bool = True) -> ModelSet:
    """Build once and return (tied base, untied fine-tuned) of ``shape``."""
    spec = {"v": GENERATOR_VERSION, "shape": SHAPES[shape], "noise": noise, "shard": SHARD}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root() / f"{shape}-{key}"
    base, ft = root / "base-tied", root / "ft-untied"
    for folder, tied, ft_seed in ((base, True, None), (ft, False, 1)):
        if (folder / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        write_model(folder, qwen2_config(shape, tied=tied), base_seed=0, ft_seed=ft_seed, noise=noise,
                    max_shard_size=SHARD, sources={"lm_head.weight": "model.embed_tokens.weight"})
        if verbose:
            print(f"[fullsize] wrote {folder} in {time.perf_counter() - t0:.1f}s", flush=True)
    cfg = qwen2_config(shape, tied=True)
    params = sum(_numel(s) for n, s in param_shapes(cfg) if n != "lm_head.weight")
    nbytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return ModelSet(size=shape, base=base, fts=[ft], params=params, bytes_per_model=nbytes, config=SHAPES[shape])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=list(SHAPES))
    args = ap.parse_args(argv)
    print(json.dumps(get_pair(args.shape).to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
