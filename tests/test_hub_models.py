"""Hub models through huggingface_hub against the loopback Hub (tests/hub_server.py): Check reads metadata
and safetensors headers only; the steps that read tensors download the weights once, with progress, at
the commit Check pinned; every failure is one line and leaves nothing half-written that is trusted."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from acm.checkpoints.compatibility import check_compatibility
from acm.checkpoints.models import fetch_all, resolve_model
from acm.errors import InputError, OfflineError
from tests.fixtures import HUB_BASE, HUB_DATASET, HUB_FT, HUB_GATED, HUB_MISSING, make_tiny_model
from tests.hub_server import LFS_SUFFIXES

HEADER_READ = 100_001          # huggingface_hub reads a safetensors header with one `Range: bytes=0-100000`


def _weights(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_check_on_a_hub_pair_downloads_no_weights(loopback_hub, hub_folders):
    t0 = time.perf_counter()
    base, ft = resolve_model(HUB_BASE), resolve_model(HUB_FT)
    report = check_compatibility(base, [ft])
    wall = time.perf_counter() - t0
    assert report.num_layers == 2 and base.needs_download and ft.needs_download
    assert base.commit == loopback_hub.commits[(HUB_BASE, "main")] and ft.commit == loopback_hub.commits[(HUB_FT, "main")]
    for repo, folder in ((HUB_BASE, hub_folders["base"]), (HUB_FT, hub_folders["ft"])):
        served = loopback_hub.served_files(repo)
        for name in _weights(folder):
            assert served.get(name, 0) <= HEADER_READ, (repo, name, served)      # a header read, never the file
        assert not [n for n in served if n.endswith(LFS_SUFFIXES) and n not in _weights(folder)]
        assert not list((loopback_hub.home / "hub").rglob("*.safetensors"))
    # the headers say what the local files say
    local = resolve_model(str(hub_folders["ft"]))
    assert sorted(ft.reader.keys()) == sorted(local.reader.keys())
    assert all(ft.reader.shape(k) == local.reader.shape(k) and ft.reader.dtype(k) == local.reader.dtype(k)
               for k in local.reader.keys())
    assert ft.reader.numel() == local.reader.numel()
    total = sum(_weights(hub_folders["base"]).values()) + sum(_weights(hub_folders["ft"]).values())
    weights_served = sum(loopback_hub.bytes_served(r, n) for r, f in ((HUB_BASE, "base"), (HUB_FT, "ft"))
                         for n in _weights(hub_folders[f]))
    print(f"\ncheck on the loopback pair: {loopback_hub.bytes_served()} bytes served "
          f"({weights_served} of them safetensors headers) of {total} bytes of weights; {wall:.2f} s")
    assert weights_served < total / 3


def test_analysis_downloads_the_weights_once_with_progress_at_the_pinned_commit(loopback_hub, hub_folders):
    from acm.activations.analysis import analyze

    texts = [f"what is {i} plus {i}? it is {2 * i}." for i in range(8)]
    seen: list[tuple[float, str]] = []
    kw = dict(samples=4, clusters=2, max_tokens=16, batch_size=4, device="cpu", show_progress=False)
    result = analyze(HUB_BASE, [HUB_FT], texts, progress=lambda f, m: seen.append((f, m)), **kw)
    downloads = [(f, m) for f, m in seen if m.startswith("downloading")]
    assert downloads and all(" of " in m and "/s" in m for _, m in downloads)
    for repo in (HUB_BASE, HUB_FT):
        fracs = [f for f, m in downloads if f"downloading {repo}:" in m]
        assert fracs == sorted(fracs) and fracs[-1] == 1.0, (repo, fracs)
    for repo, folder in ((HUB_BASE, hub_folders["base"]), (HUB_FT, hub_folders["ft"])):
        for name, size in _weights(folder).items():         # each weight file once (+ the header read)
            assert size <= loopback_hub.bytes_served(repo, name) <= size + HEADER_READ
    models = result.provenance["models"]
    assert models["base"]["commit"] == loopback_hub.commits[(HUB_BASE, "main")]
    assert models["fine_tuned"][0]["commit"] == loopback_hub.commits[(HUB_FT, "main")]
    # a second step finds them in the cache: no weight byte moves again
    loopback_hub.reset_counts()
    analyze(HUB_BASE, [HUB_FT], texts, **kw)
    assert not [n for n in loopback_hub.served_files(HUB_FT) if n.endswith(".safetensors")]


def test_merge_from_the_hub_keeps_the_revision_check_pinned(loopback_hub, hub_folders, tmp_path):
    from acm.merging.engine import MergeOptions, merge_models

    v2 = resolve_model(HUB_FT, revision="v2")
    assert v2.commit == loopback_hub.commits[(HUB_FT, "v2")]
    # the branch moves on after Check: the merge still reads the commit Check saw
    loopback_hub.add_model(HUB_FT, make_tiny_model(tmp_path / "newer", "qwen2", seed=9, hidden_size=128,
                                                    intermediate_size=256, num_attention_heads=2,
                                                    num_key_value_heads=1), branch="v2")
    seen: list[tuple[float, str]] = []
    merge_models(resolve_model(HUB_BASE), [v2], tmp_path / "out", MergeOptions(),
                 progress=lambda f, m: seen.append((f, m)), show_progress=False)
    assert _sha(v2.weight_files[0]) == _sha(hub_folders["ft_v2"] / "model.safetensors")
    assert any(m.startswith(f"downloading {HUB_FT}") for _, m in seen)
    recipe = json.loads((tmp_path / "out" / "acm_recipe.json").read_text())
    assert loopback_hub.commits[(HUB_FT, "v2")] in json.dumps(recipe)


@pytest.mark.parametrize("spec, revision, words", [
    (HUB_MISSING, None, "not found on the Hub"),
    (HUB_GATED, None, "is gated"),
    (HUB_BASE, "no-such-branch", "revision 'no-such-branch' not found"),
    ("bad id with spaces", None, "neither an existing local folder nor a valid Hub model id"),
])
def test_hub_failures_are_one_line(loopback_hub, spec, revision, words):
    with pytest.raises(InputError) as e:
        resolve_model(spec, revision=revision)
    assert words in _one_line(e)


def test_a_failed_download_leaves_nothing_trusted_and_a_retry_succeeds(loopback_hub, hub_folders):
    src = resolve_model(HUB_BASE)
    loopback_hub.break_download(HUB_BASE, "model.safetensors", after_bytes=300_000, then_status=503)
    with pytest.raises(OfflineError) as e:
        src.fetch_weights(show_progress=False)
    assert "cannot download" in _one_line(e)
    cache = loopback_hub.home / "hub"
    assert not list(cache.rglob("*.incomplete")) and not list(cache.rglob("*.safetensors"))
    assert src.needs_download                                       # still headers only
    again = resolve_model(HUB_BASE)                                  # a later step does not trust anything
    assert again.needs_download
    loopback_hub.heal()
    src.fetch_weights(show_progress=False)
    assert not src.needs_download
    assert _sha(src.weight_files[0]) == _sha(hub_folders["base"] / "model.safetensors")
    assert src.reader.get("model.embed_tokens.weight").shape[1] == 128     # a real reader now


def test_a_dropped_connection_is_retried_by_huggingface_hub(loopback_hub, hub_folders):
    src = resolve_model(HUB_BASE)
    loopback_hub.break_download(HUB_BASE, "model.safetensors", after_bytes=200_000)
    src.fetch_weights(show_progress=False)
    assert _sha(src.weight_files[0]) == _sha(hub_folders["base"] / "model.safetensors")


def test_a_full_disk_is_refused_before_the_first_byte(loopback_hub, hub_folders, monkeypatch):
    from acm.checkpoints import hub

    monkeypatch.setattr(hub, "free_bytes", lambda path: 1_000_000)
    srcs = [resolve_model(HUB_BASE), resolve_model(HUB_FT)]
    loopback_hub.reset_counts()
    with pytest.raises(InputError) as e:
        fetch_all(srcs, show_progress=False)
    line = _one_line(e)
    need = sum(_weights(hub_folders["base"]).values()) + sum(_weights(hub_folders["ft"]).values())
    from acm.sizes import format_bytes
    assert f"{format_bytes(need)} needed" in line and f"{format_bytes(1_000_000)} free" in line
    assert loopback_hub.bytes_served() == 0


def test_offline_after_a_download_uses_the_cache(loopback_hub, monkeypatch):
    from huggingface_hub import constants

    resolve_model(HUB_BASE).fetch_weights(show_progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    src = resolve_model(HUB_BASE)
    assert not src.needs_download and src.commit == loopback_hub.commits[(HUB_BASE, "main")]
    with pytest.raises(OfflineError) as e:
        resolve_model(HUB_FT)                                        # never downloaded
    assert "offline" in _one_line(e)


def test_calibration_from_a_hub_dataset(loopback_hub):
    from acm.activations.calibration import load_texts

    texts = load_texts(HUB_DATASET)
    assert len(texts) == 24 and texts[0].startswith("what is 0 plus 0")


def test_cli_merge_of_a_hub_pair_shows_a_download_bar(loopback_hub, tmp_path, capsys, monkeypatch):
    import sys

    from acm.cli import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)          # the CLI draws bars on a terminal only
    assert main(["merge", "--base", HUB_BASE, "--ft", HUB_FT, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert f"downloading {HUB_BASE}" in err and f"downloading {HUB_FT}" in err
    assert (tmp_path / "o" / "config.json").is_file()


def test_cli_hub_errors_are_one_line_with_exit_2(loopback_hub, tmp_path, capsys):
    from acm.cli import main

    assert main(["merge", "--base", HUB_GATED, "--ft", HUB_FT, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is gated" in err[0]


def test_app_check_then_analyse_a_hub_pair(loopback_hub, hub_folders, monkeypatch):
    """The app's Check answers from metadata; its Analyse (Hub dataset calibration) shows the download."""
    from components import analysis, calibration, models
    from components.state import SessionState

    monkeypatch.delenv("ACM_CACHE_DIR", raising=False)
    st = SessionState()
    try:
        summary = models.check_models(st, HUB_BASE, [HUB_FT])
        assert "Compatible" in summary
        assert not [n for r in (HUB_BASE, HUB_FT) for n, b in loopback_hub.served_files(r).items()
                    if n.endswith(".safetensors") and b > HEADER_READ]
        seen: list[tuple[float, str]] = []
        out = analysis.run_analysis(st, HUB_BASE, [HUB_FT], cal_mode=calibration.HUB, hub_id=HUB_DATASET,
                                    samples=4, clusters=2, max_tokens=16, device="cpu",
                                    progress=lambda f, m: seen.append((f, m)))
        assert out["analysis"].provenance["models"]["base"]["commit"] == loopback_hub.commits[(HUB_BASE, "main")]
        lines = [m for _, m in seen if m.startswith("downloading")]
        assert any(m.startswith(f"downloading {HUB_BASE}: ") for m in lines)
        assert any(m.startswith(f"downloading {HUB_FT}: ") for m in lines)
        assert loopback_hub.bytes_served(HUB_DATASET) > 0
    finally:
        st.close()


def test_app_chat_shows_a_hub_download_in_the_model_column(loopback_hub, monkeypatch):
    from components import chat
    from components.state import SOURCE_MODELS, SessionState

    monkeypatch.setattr(SOURCE_MODELS, "get", lambda key, loader: loader())     # no model kept across tests
    loopback_hub.bytes_per_second = 1.5e6                                         # ~1 s per model
    st = SessionState()
    try:
        frames = list(chat.chat_stream(st, "what is 1 plus 1?", HUB_BASE, [HUB_FT], max_new_tokens=4,
                                       device="cpu", dtype="float32"))
    finally:
        st.close()
    n = len(chat.SLOTS)
    lines = [frame[n + chat.SLOTS.index("base")] for frame in frames]
    assert any(f"downloading {HUB_BASE}: " in line and "/s" in line for line in lines)
    assert any(f"downloading {HUB_FT}: " in frame[n + chat.SLOTS.index("ft0")] for frame in frames)
    assert "downloading" not in frames[-1][n + chat.SLOTS.index("base")]
