"""Model resolution and compatibility checks (acm.checkpoints.models): one-line errors before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acm.checkpoints.compatibility import check_compatibility
from acm.checkpoints.models import load_causal_lm, parse_dtype, pick_device, resolve_model
from acm.errors import CompatibilityError, InputError, OfflineError
from tests.fixtures import make_pair, make_tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base, fts = make_pair(root, "llama", n_ft=1)
    return root, resolve_model(str(base)), resolve_model(str(fts[0]))


def _line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_resolve_local_folder(pair):
    _, base, _ = pair
    assert base.weight_format == "safetensors" and base.weight_files
    assert base.num_layers == 2 and base.hidden_size == 16 and base.vocab_size > 0
    assert base.provenance()["architecture"] == "LlamaForCausalLM"


def test_missing_folder(tmp_path):
    with pytest.raises(InputError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert "not found" in _line(e)
    with pytest.raises(InputError, match="no model given"):
        resolve_model("  ")


def test_file_or_folder_without_config(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_model(str(tmp_path / "f.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_compatible_pair(pair):
    _, base, ft = pair
    report = check_compatibility(base, [ft])
    assert report.num_layers == 2 and report.hidden_size == 16 and not report.vocab_notes
    assert "LlamaForCausalLM" in report.summary()


@pytest.mark.parametrize("family, overrides, what", [
    ("llama", dict(hidden_size=32, intermediate_size=64), "hidden size"),
    ("llama", dict(num_hidden_layers=3), "layer count"),
    ("mistral", dict(), "architecture"),
])
def test_mismatch_is_one_line_compatibility_error(pair, tmp_path, family, overrides, what):
    _, base, _ = pair
    other = resolve_model(str(make_tiny_model(tmp_path / "other", family, **overrides)))
    with pytest.raises(CompatibilityError) as e:
        check_compatibility(base, [other])
    assert what in _line(e)


def test_tensor_shape_mismatch(pair, tmp_path):
    _, base, _ = pair
    other = resolve_model(str(make_tiny_model(tmp_path / "ffn", "llama", intermediate_size=48)))
    with pytest.raises(CompatibilityError) as e:
        check_compatibility(base, [other])
    assert "shape of" in _line(e)


def test_grown_vocabulary_is_a_note_not_an_error(pair, tmp_path):
    root, base, _ = pair
    big = resolve_model(str(make_tiny_model(tmp_path / "bigvocab", "llama", seed=3, init_from=base.path,
                                            vocab_size=base.vocab_size + 5)))
    report = check_compatibility(base, [big])
    assert len(report.vocab_notes) == 1 and "vocabulary" in report.vocab_notes[0]


def test_needs_one_to_three_fine_tuned(pair):
    _, base, ft = pair
    with pytest.raises(InputError, match="at least one"):
        check_compatibility(base, [])
    with pytest.raises(InputError, match="at most 3"):
        check_compatibility(base, [ft] * 4)


def _pickle_only_copy(src_dir, dst):
    dst.mkdir()
    for f in src_dir.iterdir():
        if f.suffix != ".safetensors":
            dst.joinpath(f.name).write_bytes(f.read_bytes())
    state = {}
    for f in src_dir.glob("*.safetensors"):
        state.update(load_file(str(f)))
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_bin_only_folder_refused_unless_allow_pickle(pair, tmp_path):
    _, base, _ = pair
    folder = _pickle_only_copy(base.path, tmp_path / "binonly")
    with pytest.raises(InputError) as e:
        resolve_model(str(folder))
    msg = _line(e)
    assert "pickle" in msg and "--allow-pickle" in msg
    src = resolve_model(str(folder), allow_pickle=True)
    assert src.weight_format == "pickle"
    assert set(src.reader.keys()) == set(base.reader.keys())
    assert torch.equal(src.reader.get("lm_head.weight"), base.reader.get("lm_head.weight"))


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as e:
        resolve_model("some-org/some-model-that-is-not-cached")
    assert "offline" in _line(e).lower()


def test_corrupt_safetensors_is_one_line(tmp_path):
    folder = make_tiny_model(tmp_path / "c", "llama")
    (shard,) = folder.glob("*.safetensors")
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    src = resolve_model(str(folder))          # headers are read lazily, on first use
    with pytest.raises(InputError) as e:
        src.reader.keys()
    assert "corrupt" in _line(e)


def test_bad_config_is_one_line(tmp_path):
    folder = make_tiny_model(tmp_path / "b", "llama")
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    with pytest.raises(InputError) as e:
        resolve_model(str(folder))
    _line(e)


def test_device_and_dtype_helpers():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device"):
        pick_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device("cuda")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None and parse_dtype("auto") is None
    with pytest.raises(InputError, match="unknown dtype"):
        parse_dtype("int3")


def test_load_causal_lm_eval_mode_and_pad_token(pair):
    _, base, _ = pair
    model, tok = load_causal_lm(base, device="cpu")
    assert not model.training and tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32
