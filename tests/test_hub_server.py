"""The loopback Hub (tests/hub_server.py) speaks the Hub's protocol as huggingface_hub and datasets use it:
each behaviour the project's Hub tests rely on is checked here through the real clients."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.fixtures import HUB_BASE, HUB_DATASET, HUB_FT, HUB_GATED, HUB_MISSING


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_info_download_and_revisions(loopback_hub, hub_folders):
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(HUB_FT, files_metadata=True)
    assert info.sha == loopback_hub.commits[(HUB_FT, "main")]
    names = {s.rfilename: s.size for s in info.siblings}
    assert "model.safetensors.index.json" in names and names["config.json"] > 0
    v2 = HfApi().model_info(HUB_FT, revision="v2")
    assert v2.sha == loopback_hub.commits[(HUB_FT, "v2")] != info.sha
    pinned = hf_hub_download(HUB_FT, "config.json", revision=v2.sha)
    assert v2.sha in pinned and Path(pinned).read_bytes() == (hub_folders["ft_v2"] / "config.json").read_bytes()
    assert str(loopback_hub.home) in pinned


@pytest.mark.parametrize("redirect", [True, False], ids=["via-cdn-redirect", "direct"])
def test_safetensors_header_is_read_with_a_range(loopback_hub, hub_folders, redirect):
    from huggingface_hub import HfApi, hf_hub_download

    loopback_hub.redirect_lfs = redirect
    meta = HfApi().parse_safetensors_file_metadata(HUB_BASE, "model.safetensors")
    size = (hub_folders["base"] / "model.safetensors").stat().st_size
    assert meta.tensors and size > 400_000
    assert loopback_hub.bytes_served(HUB_BASE, "model.safetensors") <= 100_001
    assert any(r[3] and r[3].startswith("bytes=0-") and r[4] == 206 for r in loopback_hub.requests)
    assert any(r[4] == 302 for r in loopback_hub.requests) == redirect
    path = hf_hub_download(HUB_BASE, "model.safetensors")
    assert _sha(path) == _sha(hub_folders["base"] / "model.safetensors")


def test_errors_map_to_huggingface_hub_exceptions(loopback_hub):
    from huggingface_hub import HfApi, errors, hf_hub_download

    with pytest.raises(errors.RepositoryNotFoundError):
        HfApi().model_info(HUB_MISSING)
    with pytest.raises(errors.RevisionNotFoundError):
        HfApi().model_info(HUB_BASE, revision="no-such-branch")
    with pytest.raises(errors.GatedRepoError):
        hf_hub_download(HUB_GATED, "config.json")
    with pytest.raises(errors.RemoteEntryNotFoundError):
        hf_hub_download(HUB_BASE, "no-such-file.json")


def test_dropped_connection_is_resumed_then_a_failure_leaves_nothing(loopback_hub, hub_folders):
    from huggingface_hub import errors, hf_hub_download

    loopback_hub.break_download(HUB_BASE, "model.safetensors", after_bytes=150_000)
    path = hf_hub_download(HUB_BASE, "model.safetensors")          # resumed by huggingface_hub with a Range
    assert _sha(path) == _sha(hub_folders["base"] / "model.safetensors")
    resumed = [r for r in loopback_hub.requests if r[0] == "GET" and r[2] == "model.safetensors" and r[4] == 206]
    assert resumed and resumed[-1][3] == "bytes=131072-", loopback_hub.requests   # two 64 KiB chunks had landed

    loopback_hub.break_download(HUB_FT, "model.safetensors.index.json", after_bytes=10, then_status=503)
    with pytest.raises(errors.HfHubHTTPError):
        hf_hub_download(HUB_FT, "model.safetensors.index.json")
    cache = loopback_hub.home / "hub"
    assert not list(cache.rglob("*.incomplete"))
    assert not [p for p in cache.rglob("model.safetensors.index.json")]
    loopback_hub.heal()
    again = hf_hub_download(HUB_FT, "model.safetensors.index.json")
    assert Path(again).read_bytes() == (hub_folders["ft"] / "model.safetensors.index.json").read_bytes()


def test_snapshot_download_and_dataset(loopback_hub, hub_folders):
    import datasets
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(HUB_FT, allow_patterns=["*.json"]))
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))
    ds = datasets.load_dataset(HUB_DATASET, split="train")
    assert ds.num_rows == 24 and ds[0]["text"].startswith("what is 0")
