"""Streamed merge I/O (issue 11): positioned-read inputs, planned shard files, the light start-up path
(configs as JSON, tokenizer facts without transformers), GPU durations sized from the job, fit advice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acm.checkpoints.shards import ShardWriter
from acm.checkpoints.tensors import StreamedTensor, TensorReader, Window
from acm.errors import InputError
from tests.fixtures import make_pair

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def stored(tmp_path):
    """One shard with float tensors of three dtypes and an integer buffer, at unaligned-looking sizes."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(1001, 7, generator=g).to(torch.bfloat16),
               "b.f32": torch.randn(333, generator=g),
               "c.f16": torch.randn(17, 5, generator=g).to(torch.float16),
               "d.i64": torch.arange(9, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


@pytest.mark.parametrize("window_bytes", [64, 1000, 1 << 20])
def test_streamed_slices_equal_the_stored_tensor(stored, window_bytes):
    path, tensors = stored
    reader = TensorReader([path])
    for key in ("a.bf16", "b.f32", "c.f16"):
        want = tensors[key].reshape(-1)
        x = reader.stream(key, Window(window_bytes))
        assert isinstance(x, StreamedTensor) and x.numel() == want.numel() and x.dtype == want.dtype
        n = want.numel()
        for s, e in [(0, 5), (3, 200), (200, n), (n - 1, n), (0, n)]:
            assert torch.equal(x[s:e], want[s:e]), (key, s, e)
        for sl in [slice(3, n, 7), slice(0, n, 13), slice(5, n - 2, 101), slice(1, n, 997), slice(n - 1, n, 500)]:
            assert torch.equal(x[sl], want[sl]), (key, sl)     # dense strides read, sparse ones mapped briefly
        assert torch.equal(x.read(10, 50), want[10:50])
        head = x.narrow_flat(20)
        assert head.numel() == 20 and torch.equal(head[0:20], want[:20])
    maps = Path("/proc/self/maps")
    if maps.exists():                    # the sparse gathers' temporary maps are gone
        assert str(path.resolve()) not in maps.read_text()
    # integer tensors are not streamed: the real tensor, flat
    assert torch.equal(reader.stream("d.i64", Window()), tensors["d.i64"])
    reader.close()


def test_streamed_read_of_a_truncated_file_is_one_clear_line(stored, tmp_path):
    path, _ = stored
    reader = TensorReader([path])
    x = reader.stream("a.bf16", Window(64))
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(InputError, match="corrupt or truncated"):
        x[0: x.numel()]


def _plan(tensors):
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


@pytest.mark.parametrize("limit", [10**9, 3000])
def test_planned_shards_load_and_match_the_buffered_writer(tmp_path, limit):
    g = torch.Generator().manual_seed(1)
    tensors = {"x.bf16": torch.randn(3, 501, generator=g).to(torch.bfloat16), "i.i64": torch.arange(5),
               "y.f32": torch.randn(7, generator=g), "z.f16": torch.randn(1000, generator=g).half(),
               "s.f32": torch.tensor(2.5)}
    outs = {}
    for mode in ("planned", "buffered"):
        folder = tmp_path / mode
        folder.mkdir()
        w = ShardWriter(folder, limit, plan=_plan(tensors) if mode == "planned" else None)
        reused = torch.empty(1 << 16, dtype=torch.uint8)
        for k, v in tensors.items():
            if mode == "planned":        # the engine's pattern: every tensor in the same reused memory
                view = reused[: v.numel() * v.element_size()].view(v.dtype).view(v.shape)
                view.copy_(v)
                w.add(k, view)
                reused.fill_(255)        # overwriting the buffer afterwards must not change the file
            else:
                w.add(k, v)
        outs[mode] = (w.close(), sorted(p.name for p in folder.iterdir()), w.total_bytes)
    assert outs["planned"] == outs["buffered"]
    folder = tmp_path / "planned"
    files = sorted(folder.glob("*.safetensors"))
    got = {}
    for f in files:
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0 and json.loads(raw[8: 8 + n])["__metadata__"] == {"format": "pt"}
        with safe_open(str(f), "pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    if len(files) > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)


def test_planned_writer_refuses_what_the_plan_does_not_say(tmp_path):
    w = ShardWriter(tmp_path, 10**9, plan=[("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(ValueError, match="plan says"):
        w.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not in the write plan"):
        w.add("c", torch.zeros(2))
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_merge_path_imports_no_transformers_and_writes_loadable_shards(tmp_path):
    """A CLI merge of a known family reads configs as JSON and the tokenizer's facts from tokenizer.json:
    transformers is never imported; the streamed shards load in transformers afterwards."""
    base, (ft,) = make_pair(tmp_path, "qwen2", n_ft=1, tie_word_embeddings=True)
    out = tmp_path / "out"
    code = ("import sys; from acm.cli import main; rc = main(sys.argv[1:]); "
            "print('TRANSFORMERS', 'transformers' in sys.modules); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "merge", "--base", str(base), "--ft", str(ft), "--method", "ties",
                          "--shard-size", "20KB", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "TRANSFORMERS False" in res.stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert sum(p.numel() for p in model.parameters()) > 0


def test_json_config_agrees_with_autoconfig_and_falls_through(tmp_path):
    from transformers import AutoConfig

    from acm.checkpoints.config import JsonConfig, full_config
    from acm.checkpoints.models import resolve_model

    base, _ = make_pair(tmp_path, "llama", n_ft=1)
    src = resolve_model(str(base))
    real = AutoConfig.from_pretrained(base)
    assert isinstance(src.config, JsonConfig)
    for attr in ("model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size",
                 "tie_word_embeddings"):
        assert getattr(src.config, attr) == getattr(real, attr), attr
    assert src.config.initializer_range == real.initializer_range
    assert type(full_config(src.config)) is type(real)
    assert src.num_layers == real.num_hidden_layers and src.vocab_size == real.vocab_size


def test_tokenizer_facts_match_the_loaded_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from acm.checkpoints.templates import highest_token, read_tokenizer_facts, template_family

    base, _ = make_pair(tmp_path, "llama", n_ft=1)
    for folder in (base, REPO / "assets" / "demo-models" / "tiny-math-base"):
        real, facts = AutoTokenizer.from_pretrained(folder), read_tokenizer_facts(folder)
        assert facts is not None
        assert highest_token(facts) == highest_token(real)
        assert template_family(facts) == template_family(real) and facts.chat_template == real.chat_template
        assert facts.eos_token == real.eos_token and len(facts) == len(real)


# ----------------------------------------------------------------------------- GPU sizing + fit advice


def test_gpu_seconds_follow_the_job_size(monkeypatch):
    from components import common

    sizes = {"7b-base": 7_615_616_512, "7b-ft": 7_615_616_512, "tiny-a": 1_000_000, "tiny-b": 1_000_000}
    monkeypatch.setattr(common, "model_bytes", lambda spec, trust=False: (sizes[spec], 2 * sizes[spec]))
    big = common.estimate_gpu_seconds("analysis", "7b-base", ["7b-ft"], samples=100, max_tokens=512)
    assert big > 60 * 4                      # ZeroGPU's default 60 s would abort it
    small = common.estimate_gpu_seconds("analysis", "tiny-a", ["tiny-b"], samples=16, max_tokens=128)
    assert small == common.GPU_MIN_SECONDS
    ta = common.estimate_gpu_seconds("merge", "7b-base", ["7b-ft"], method="task_arithmetic")
    ties = common.estimate_gpu_seconds("merge", "7b-base", ["7b-ft"], method="ties")
    assert 60 < ta < ties <= common.GPU_MAX_SECONDS
    more = common.estimate_gpu_seconds("analysis", "7b-base", ["7b-ft"], samples=400, max_tokens=512)
    assert big < more <= common.GPU_MAX_SECONDS

    def analyse(state, base=None, fts=None, samples=None, max_tokens=128):
        return None

    duration = common._dynamic_duration(analyse, "analysis", 300)
    assert duration(None, "7b-base", ["7b-ft"], samples=100, max_tokens=512) == big
    assert duration(None, None, None) == 300                   # nothing to size: the fixed duration
    assert duration(None, "missing", ["7b-ft"]) == 300         # sizing failed: the fixed duration


def test_gpu_decorator_is_a_no_op_without_spaces(monkeypatch):
    from components import common

    monkeypatch.setitem(sys.modules, "spaces", None)      # import fails like on a machine without it

    def merge(state, base=None, fts=None):
        return 42

    assert common.gpu(duration=600)(merge) is merge


def test_fit_advice_from_header_sizes():
    from acm.checkpoints.models import fit_advice

    cuda = torch.device("cuda")
    msg = fit_advice("org/7b", 15_231_233_024, cuda, torch.bfloat16, free_total=(10 * 10**9, 24 * 10**9))
    assert msg is not None and "17.0 GiB" in msg and "9.3 GiB of 22.4 GiB" in msg and "device auto" in msg
    assert "\n" not in msg
    assert fit_advice("org/7b", 15_231_233_024, cuda, torch.bfloat16, free_total=(80 * 10**9, 80 * 10**9)) is None
    assert fit_advice("org/7b", 10**12, torch.device("cpu"), torch.float32) is None


def test_resolved_sources_survive_a_merge_and_merge_again(tmp_path):
    """The engine closes only the descriptors it opened for streaming: a caller's ModelSource (the app keeps
    them) still reads after a merge, and a second merge with the same objects gives the same bytes."""
    from acm.checkpoints.models import resolve_model
    from acm.merging.engine import MergeOptions, merge_models

    base, (ft,) = make_pair(tmp_path, "llama", n_ft=1)
    srcs = [resolve_model(str(base)), resolve_model(str(ft))]
    a = merge_models(srcs[0], [srcs[1]], tmp_path / "a", MergeOptions(method="ties"), show_progress=False)
    key = srcs[0].reader.keys()[0]
    assert srcs[0].reader.get(key).numel() > 0
    b = merge_models(srcs[0], [srcs[1]], tmp_path / "b", MergeOptions(method="ties"), show_progress=False)
    assert (a.out_dir / "model.safetensors").read_bytes() == (b.out_dir / "model.safetensors").read_bytes()
    assert not srcs[0].reader._fds and not srcs[1].reader._fds
