"""End to end: launch the app on a free localhost port and drive it with gradio_client.

analyse (zero configuration: defaults only) → coefficients at two t → merge → chat → evaluate.
Uses the bundled demo models when present, else tiny fixture models laid out like the bundle.
Timings (coefficient redraw, first streamed token) are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "assets"
DEMO_BASE, DEMO_LONG = "tiny-math-base", "tiny-math-long"


def bundled_assets_complete(root: Path = BUNDLED) -> bool:
    return all((root / p).exists() for p in (f"demo-models/{DEMO_BASE}/config.json",
                                             f"demo-models/{DEMO_LONG}/config.json",
                                             "calibration/demo_calibration.jsonl", "eval/demo_eval.jsonl"))


def demo_assets_dir(tmp: Path) -> Path:
    """The bundled assets if complete, else a stand-in with the same layout (tiny fixture models)."""
    if bundled_assets_complete():
        return BUNDLED
    from tests.fixtures import make_pair, write_calibration

    root = tmp / "assets"
    models = root / "demo-models"
    models.mkdir(parents=True)
    base, (ft,) = make_pair(tmp / "build", "qwen2", n_ft=1)
    shutil.copytree(base, models / DEMO_BASE)
    shutil.copytree(ft, models / DEMO_LONG)
    (root / "calibration").mkdir()
    write_calibration(root / "calibration" / "demo_calibration.jsonl", n=24)
    (root / "eval").mkdir()
    rows = [{"question": f"what is {i} plus {i + 1}?", "answer": str(2 * i + 1), "level": 1 + i % 3} for i in range(12)]
    (root / "eval" / "demo_eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_of(content) -> str:
    """Chatbot message content as the client receives it (Gradio 6: a list of typed parts)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def plot_json(value) -> dict:
    """A gr.Plot output as the client receives it: {"type": "plotly", "plot": "<json>"}."""
    assert isinstance(value, dict) and value.get("type") == "plotly", value
    return json.loads(value["plot"])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    assets = demo_assets_dir(tmp_path_factory.mktemp("e2e"))
    old = os.environ.get("ACM_ASSETS_DIR")
    os.environ["ACM_ASSETS_DIR"] = str(assets)
    import app

    demo = app.create_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **app.launch_kwargs())
    try:
        yield url
    finally:
        demo.close()
        if old is None:
            os.environ.pop("ACM_ASSETS_DIR", None)
        else:
            os.environ["ACM_ASSETS_DIR"] = old


def test_full_workflow_through_the_api(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    endpoints = set(client.view_api(return_format="dict")["named_endpoints"])
    assert {"/analyse", "/coefficients", "/merge", "/chat", "/evaluate"} <= endpoints

    # 1. analyse with zero configuration (demo models, bundled calibration, small sample): the paper's rule.
    t0 = time.perf_counter()
    summary, per_layer, coef, multi, table, download = client.predict(api_name="/analyse")
    analyse_s = time.perf_counter() - t0
    assert "Analysis ready" in summary and "per-sample MI" in summary
    fig = plot_json(per_layer)
    keys = fig["data"][-1]["x"]                          # λ keys of the activation points, network order
    assert keys[0] == "embed" and keys[1] == "block.0" and keys[-2:] == ["head.norm", "head"]
    assert [d["name"].split(": ")[-1].split(" (")[0] for d in fig["data"]] == ["max", "min–max over samples",
                                                                                "mean ± std"]
    assert all(v > 0 for v in fig["data"][-1]["y"])     # mean per-sample MI in nats
    assert table["rule"] == "acm" and table["t"] == 0.7 and table["groups"] == keys
    analysis = json.loads(Path(download).read_text())
    assert analysis["sample_mi"]["point_groups"] == keys

    # 2. the coefficient curve at several t (no model work): the paper's rule, then softmax (ours).
    def coefficients(t, *extra):
        out = client.predict(t, 1.0, "", "", *extra, api_name="/coefficients")
        return out[0], out[2]

    times = []
    for t in (0.0, 2.0, 0.0, 2.0):
        t1 = time.perf_counter()
        fig0, table0 = coefficients(t)
        times.append(time.perf_counter() - t1)
    _, half = coefficients(0.0)
    steep_fig, steep = coefficients(2.0)
    lam0 = [g["lambda"] for g in half["models"][0]["groups"]]
    lam2 = [g["lambda"] for g in steep["models"][0]["groups"]]
    assert half["rule"] == "acm" and len(lam0) == len(keys) and all(abs(v - 0.5) < 1e-9 for v in lam0)
    assert all(0.5 < v < 1 for v in lam2) and statistics.pstdev(lam2) > 0
    curve = plot_json(steep_fig)["data"]
    assert curve[0]["y"] == [0.5] * len(keys)                                        # t = 0 reference line
    assert [round(v, 9) for v in curve[1]["y"]] == [round(v, 9) for v in lam2]
    _, soft = coefficients(20.0, "nmi", "softmax")
    groups = soft["groups"]
    lam20 = [g["lambda"] for g in soft["models"][0]["groups"]]
    assert soft["rule"] == "softmax" and groups[0] == "embed" and groups[-1] == "head"
    assert statistics.pstdev(lam20) > 1e-3 and abs(statistics.fmean(lam20) - 1.0) < 1e-6
    with pytest.raises(Exception, match="rule='softmax'"):                        # a softmax-era t, refused clearly
        coefficients(20.0)

    # 3. merge with the defaults (the paper's rule at t = 0.7, Eq. 3) — the old call shape still works.
    t1 = time.perf_counter()
    msummary, lam_table, report = client.predict(method="task_arithmetic", mode="ACM (per-layer λ)", t=0.7,
                                                 api_name="/merge")
    merge_s = time.perf_counter() - t1
    assert "merged in" in msummary and report["label"] == "#1 ACM-TA t=0.7"
    assert Path(report["out_dir"]).is_dir() and report["settings"]["rule"] == "acm"
    assert report["recipe"]["acm_analysis"]["rule"] == "acm"
    assert [r[0] for r in lam_table["data"]] == keys
    lam07 = [g["lambda"] for g in coefficients(0.7)[1]["models"][0]["groups"]]
    assert [round(r[1], 4) for r in lam_table["data"]] == [round(v, 4) for v in lam07]

    # 4. chat one message: the merged model and both source models reply (streamed).
    t1 = time.perf_counter()
    job = client.submit(message="What is 12 + 30?", max_new_tokens=24, api_name="/chat")
    first = None
    for update in job:
        if first is None and update[0] and text_of(update[0][-1].get("content")):
            first = time.perf_counter() - t1
    outputs = job.outputs()[-1]
    merged_hist, base_hist, long_hist = outputs[0], outputs[1], outputs[2]
    for hist in (merged_hist, base_hist, long_hist):
        assert hist[0]["role"] == "user" and text_of(hist[0]["content"]) == "What is 12 + 30?"
        assert hist[-1]["role"] == "assistant" and text_of(hist[-1]["content"]).strip()
    assert "last reply" in outputs[5] and "tokens" in outputs[5]
    bar = plot_json(outputs[10])
    assert len(bar["data"][0]["x"]) == 3

    # 5. evaluate a tiny slice: merged + sources, accuracy and length per model.
    result = client.predict(limit=4, max_new_tokens=48, api_name="/evaluate")[-1]
    assert result["n"] == 4
    kinds = [m["kind"] for m in result["models"]]
    assert kinds == ["merged", "base", "fine-tuned"]
    for m in result["models"]:
        assert 0.0 <= m["accuracy"] <= 1.0 and m["mean_length"] > 0 and m["n"] == 4
    scatter = plot_json(client.predict(limit=4, max_new_tokens=48, api_name="/evaluate")[1])
    assert sum(len(t["x"]) for t in scatter["data"]) == 3

    print(f"\n[e2e] analyse {analyse_s:.2f}s · coefficients round trip median "
          f"{statistics.median(times) * 1000:.0f} ms · merge {merge_s:.2f}s · "
          f"chat first update {first if first is None else round(first, 3)}s")


def test_coefficient_redraw_cost_in_process():
    """The server's work behind a rule / α change (λ + both figures, with the live grid the page redraws t
    from), at a 28-block, 3-model shape with 100 calibration samples; reported, not asserted."""
    import numpy as np

    from acm.activations.capture import point_names
    from acm.activations.result import AnalysisResult, ModelNMI
    from components.analysis import coefficient_view
    from components.state import SessionState

    groups = ["embed"] + [f"block.{k}" for k in range(28)] + ["head"]
    points, keys = point_names(28)
    rng = np.random.default_rng(0)
    st = SessionState()
    st.analysis = AnalysisResult(groups=groups, models=[
        ModelNMI(model=f"ft{i}", nmi=list(rng.uniform(0.3, 0.9, len(groups))), mi=[0.0] * len(groups),
                 sample_mi=rng.uniform(4, 9, (len(points), 100)).tolist()) for i in range(3)],
        sample_info={"estimator": "labels", "unit": "nats", "points": points, "point_groups": keys,
                     "tokens": [int(x) for x in rng.integers(50, 500, 100)]})
    for rule, ts in (("softmax", np.linspace(0, 40, 21)), ("acm", np.linspace(-3, 3, 21))):
        coefficient_view(st, float(ts[1]), 1.0, rule=rule)     # warm-up
        times = []
        for t in ts:
            t0 = time.perf_counter()
            fig, multi, table = coefficient_view(st, float(t), 1.0, rule=rule)
            fig.to_json(), multi.to_json()   # what gr.Plot does before sending
            times.append(time.perf_counter() - t0)
        assert len(table["models"]) == 3 and table["rule"] == rule
        print(f"\n[redraw] {rule}: {len(table['groups'])} keys × 3 models: median "
              f"{statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms (the page redraws t itself)")


def test_heavy_jobs_share_one_slot_and_endpoints_are_named():
    """Two users can never run two analyses / merges / evaluations at once on one GPU."""
    import app

    demo = app.build_app()
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    for name in ("analyse_heavy", "merge_heavy", "evaluate"):
        assert deps[name].concurrency_id == "heavy" and deps[name].concurrency_limit == 1, name
    # /analyse answers cache hits outside the heavy group; a miss holds the same slot in process.
    assert deps["analyse"].concurrency_id != "heavy" and deps["merge"].concurrency_id != "heavy"
    assert all(getattr(d.fn, "_holds_heavy", False) for d in demo.fns.values() if d.concurrency_id == "heavy")
    for name in ("analyse", "coefficients", "merge", "chat", "evaluate"):
        assert deps[name].api_visibility == "public", name
    assert deps["chat"].concurrency_id == "chat"
    assert not deps["coefficients"].queue                      # instant: no queueing behind heavy jobs


def test_two_sessions_at_once_keep_their_own_state_and_heavy_jobs_queue(app_url, monkeypatch):
    """Two gradio_client sessions analyse and merge at the same time, with different settings:
    each gets its own analysis, coefficients and merge (no cross-talk through globals), and the
    heavy jobs run one at a time (the shared "heavy" slot), the other waiting in the queue."""
    import threading

    from gradio_client import Client

    import components.analysis as ca
    import components.merge as cm

    lock, active, spans = threading.Lock(), {"now": 0, "max": 0}, []

    def tracked(fn):
        def wrapper(*args, **kwargs):
            if not kwargs.get("compute", True):        # the light path's cache look-up: no model work
                return fn(*args, **kwargs)
            with lock:
                active["now"] += 1
                active["max"] = max(active["max"], active["now"])
            t0 = time.monotonic()
            try:
                time.sleep(0.3)          # widen each job so an overlap could not slip through
                return fn(*args, **kwargs)
            finally:
                with lock:
                    active["now"] -= 1
                    spans.append((t0, time.monotonic()))
        return wrapper

    monkeypatch.setattr(ca, "run_analysis", tracked(ca.run_analysis))
    monkeypatch.setattr(cm, "run_merge", tracked(cm.run_merge))
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    ja = a.submit(samples=6, bins=32, seed=1, api_name="/analyse")
    jb = b.submit(samples=10, bins=64, seed=2, api_name="/analyse")
    ra, rb = ja.result(timeout=300), jb.result(timeout=300)
    an_a, an_b = json.loads(Path(ra[5]).read_text()), json.loads(Path(rb[5]).read_text())
    assert (an_a["provenance"]["bins"], an_b["provenance"]["bins"]) == (32, 64)
    assert (an_a["provenance"]["calibration"]["size"], an_b["provenance"]["calibration"]["size"]) == (6, 10)
    assert Path(ra[5]).parent != Path(rb[5]).parent                       # separate session workspaces

    # Each session's coefficients come from its own analysis.
    for client, an in ((a, an_a), (b, an_b)):
        table = client.predict(8.0, 1.0, "", "", "nmi", "softmax", api_name="/coefficients")[2]
        nmi = [g["nmi"] for g in table["models"][0]["groups"]]
        assert nmi == pytest.approx(an["models"][0]["nmi"])

    ma = a.submit(method="task_arithmetic", mode="plain (α everywhere)", alpha=0.3, api_name="/merge")
    mb = b.submit(method="ties", mode="ACM (per-layer λ)", t=4.0, alpha=1.0, density=0.5, rule="softmax",
                  api_name="/merge")
    rep_a, rep_b = ma.result(timeout=300)[2], mb.result(timeout=300)[2]
    assert rep_a["label"] == "#1 TA α=0.3" and rep_b["label"] == "#1 TIES softmax t=4 α=1"   # per-session counters
    assert Path(rep_a["out_dir"]).is_dir() and Path(rep_b["out_dir"]).is_dir()
    assert Path(rep_a["out_dir"]).parents[1] != Path(rep_b["out_dir"]).parents[1]
    assert active["max"] == 1 and len(spans) == 4                          # queued, never two at once
    spans.sort()
    assert all(end <= nxt_start + 1e-3 for (_, end), (nxt_start, _) in zip(spans, spans[1:]))


def test_upload_boxes_cannot_read_server_files_over_http(app_url, tmp_path):
    """An API caller that names a server path instead of uploading (or types one into the Hub box)
    gets an error, never the file's contents."""
    import httpx

    secret = tmp_path / "server_secret.jsonl"
    secret.write_text(json.dumps({"text": "TOP-SECRET-CALIBRATION"}) + "\n")
    file_data = {"path": str(secret), "orig_name": "x.jsonl", "meta": {"_type": "gradio.FileData"}}
    attempts = [["Upload a file", file_data, "", "train", ""],
                ["Upload a file", {**file_data, "path": f"{tmp_path}/../{tmp_path.name}/server_secret.jsonl"},
                 "", "train", ""],
                ["Hub dataset", None, str(secret), "train", ""]]
    base = app_url.rstrip("/")
    for data in attempts:
        event = httpx.post(f"{base}/gradio_api/call/calibration_preview", json={"data": data}, timeout=30)
        assert event.status_code == 200, event.text
        stream = httpx.get(f"{base}/gradio_api/call/calibration_preview/{event.json()['event_id']}", timeout=60).text
        assert "event: error" in stream and "TOP-SECRET" not in stream, (data, stream)


def test_queue_is_bounded():
    import app

    demo = app.create_app(prewarm=False)
    assert demo._queue.max_size == 32 and demo._queue.default_concurrency_limit == 4


def test_cli_arguments(monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert args.port == 7999 and args.share is False
    assert app.parse_args(["--port", "8001", "--share"]).port == 8001
