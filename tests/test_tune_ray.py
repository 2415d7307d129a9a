"""``acm tune --executor ray`` on a real local Ray cluster (127.0.0.1, 2 CPUs, started by the tests).

The same 4-setting demo grid (plain TIES + softmax ACM-TIES at three t) on 4 + 4 problems: the Ray run writes
the same records, frontier and recommendation as the local executor; a worker killed mid-setting is retried
and the setting recorded with its attempts; a driver killed mid-grid resumes without redoing what finished.
Ray is an optional extra: these tests skip without it, except under CI (which installs it and must run them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from acm.tune import expand_grid, read_results, run_tune

if os.environ.get("CI"):
    import ray  # noqa: F401  (CI installs requirements-ray.txt: a missing Ray must fail there, not skip)
else:
    pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "assets" / "demo-models" / "tiny-math-base"
LONG = REPO / "assets" / "demo-models" / "tiny-math-long"
pytestmark = [pytest.mark.skipif(not (BASE / "config.json").is_file(), reason="bundled demo models missing"),
              pytest.mark.timeout(900)]     # a local Ray start-up on a loaded 2-core machine takes tens of seconds
GRID = expand_grid(["ties"], [0.7], [1, 2, 4], [0.7], rules=["softmax"])      # plain + 3 t = 4 settings
RUN = {"limit": 8, "holdout": 0.5, "max_new_tokens": 24, "batch_size": 8, "threads": 1, "show_progress": False}
TASK_TITLE = "ray::setting_task"           # Ray's process title of a worker running acm.tune_ray.setting_task


@pytest.fixture(scope="module")
def analysis_file(tmp_path_factory) -> Path:
    from acm.activations.result import AnalysisResult, ModelNMI

    groups = ["embed"] + [f"block.{i}" for i in range(6)] + ["head"]
    nmi = [0.48, 0.25, 0.25, 0.23, 0.22, 0.20, 0.15, 0.24]
    path = tmp_path_factory.mktemp("an") / "analysis.json"
    AnalysisResult(groups=groups, models=[ModelNMI(model=str(LONG), nmi=nmi, mi=nmi)], provenance={}).save(path)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, analysis_file) -> tuple[dict, dict]:
    """(records by (kind, key, split), report) of the grid on the local executor."""
    out = tmp_path_factory.mktemp("local")
    report = run_tune(str(BASE), [str(LONG)], out, GRID, analysis=analysis_file, **RUN)
    return _records(out), report


def _records(out: Path) -> dict:
    drop = ("seconds", "attempts", "started")
    return {(r["kind"], r.get("key"), r.get("split")): {k: v for k, v in r.items() if k not in drop}
            for r in read_results(out / "tune.jsonl")}


def _task_pids() -> set[int]:
    """Worker processes of this test's cluster (children of the raylet it started) now running a setting."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(TASK_TITLE):
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


class Watch(threading.Thread):
    """Polls the setting tasks' worker processes while a run goes; with ``kill``, SIGKILLs the first one seen."""

    def __init__(self, kill: bool = False):
        super().__init__(daemon=True)
        self.kill, self.seen, self.killed, self.busy_at_once = kill, set(), None, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _task_pids()
            self.seen |= pids
            self.busy_at_once = max(self.busy_at_once, len(pids))
            if self.kill and self.killed is None and pids:
                self.killed = min(pids)
                os.kill(self.killed, signal.SIGKILL)
            time.sleep(0.02)

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()


class TestOnOneLocalCluster:
    """Both in-process runs share one local cluster (2 CPUs: two workers run settings side by side)."""

    @pytest.fixture(scope="class")
    def executor(self):
        from acm.tune_ray import RayExecutor

        with RayExecutor(num_cpus=2, max_retries=2) as ex:
            yield ex

    def test_same_records_frontier_and_recommendation_as_local(self, executor, local_run, analysis_file, tmp_path):
        with Watch() as watch:
            report = run_tune(str(BASE), [str(LONG)], tmp_path, GRID, analysis=analysis_file, executor=executor,
                              **RUN)
        records, local_report = local_run
        assert _records(tmp_path) == records                 # every reference, setting and held-out number
        assert report["frontier"] == local_report["frontier"] and report["complete"] and not report["failed"]
        assert report["recommended"] == local_report["recommended"]
        assert len(watch.seen) >= 2, "the settings should have run in at least two worker processes"
        attempts = [r["attempts"] for r in read_results(tmp_path / "tune.jsonl") if r["kind"] == "setting"]
        assert attempts == [1, 1, 1, 1]
        assert not list(tmp_path.glob(".tmp-merges-*"))

    def test_a_killed_worker_is_retried_and_the_grid_completes(self, executor, local_run, analysis_file, tmp_path):
        with Watch(kill=True) as watch:
            report = run_tune(str(BASE), [str(LONG)], tmp_path, GRID, analysis=analysis_file, executor=executor,
                              **RUN)
        assert watch.killed is not None, "no setting task was seen running"
        settings = [r for r in read_results(tmp_path / "tune.jsonl") if r["kind"] == "setting"]
        assert sorted(r["attempts"] for r in settings) == [1, 1, 1, 2]     # the killed one ran again, once
        assert report["complete"] and not report["failed"]
        assert _records(tmp_path) == local_run[0]          # and the retried setting measured the same

    def test_past_its_retries_a_setting_is_recorded_failed_then_a_resume_runs_it(self, executor, local_run,
                                                                                  analysis_file, tmp_path):
        from acm.tune_ray import RayExecutor

        no_retry = RayExecutor(max_retries=0)      # the same (already started) cluster, no second chance
        try:
            with Watch(kill=True):
                report = run_tune(str(BASE), [str(LONG)], tmp_path, GRID, analysis=analysis_file, executor=no_retry,
                                  **RUN)
        finally:
            no_retry.close()                        # it did not start Ray, so the cluster stays up
        failed = [r for r in read_results(tmp_path / "tune.jsonl") if r["kind"] == "failed"]
        assert len(failed) == 1 and "worker died" in failed[0]["reason"] and failed[0]["attempts"] == 1
        assert [f["key"] for f in report["failed"]] == [failed[0]["key"]] and not report["complete"]
        assert failed[0]["key"] not in report["frontier"] and report["done"] == 3
        assert "1 setting(s) failed" in (tmp_path / "frontier.md").read_text()
        report = run_tune(str(BASE), [str(LONG)], tmp_path, GRID, analysis=analysis_file, executor=executor, **RUN)
        assert report["complete"] and not report["failed"] and report["resumed"] == 3
        assert report["frontier"] == local_run[1]["frontier"]

    def test_the_tune_tab_submits_to_ACM_RAY_ADDRESS(self, executor, analysis_file, monkeypatch):
        from acm.activations.result import AnalysisResult
        from components import tune as panel
        from components.state import SessionState

        monkeypatch.setenv("ACM_RAY_ADDRESS", executor.start().get_runtime_context().gcs_address)
        monkeypatch.setattr(panel, "_RAY", None)
        st = SessionState()
        st.analysis, st.base, st.fts = AnalysisResult.load(analysis_file), str(BASE), [str(LONG)]
        try:
            steps = list(panel.iter_tune_ui(st, str(BASE), [str(LONG)], rules=["softmax"], softmax_ts="1, 4",
                                            ts="", limit=6, max_new_tokens=16))
        finally:
            st.close()
        records, report, running = steps[-1]
        assert isinstance(panel._RAY, type(executor)) and not running and report["complete"]
        assert all(r["attempts"] == 1 for r in records if r["kind"] == "setting")   # each one a Ray task
        assert [rep["done"] for _, rep, run in steps if run and 0 < rep["done"] < 3], "points stream in"


def _leftover_ray(marker: str) -> list:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_cli_resumes_after_the_driver_is_killed(tmp_path, analysis_file, request):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "acm", "tune", "--base", str(BASE), "--ft", str(LONG), "--analysis",
           str(analysis_file), "--limit", "8", "--max-new-tokens", "24", "--batch-size", "8", "--threads", "1",
           "--rules", "softmax", "--ts", "1", "2", "4", "--executor", "ray", "--ray-cpus", "2", "--out", str(out)]
    tmp = Path(tempfile.mkdtemp(prefix="acmray", dir="/tmp"))   # the CLI cluster's session folder: short (Ray's
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))   # sockets live there), and marks its processes
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("kind") == "setting" for r in read_results(out / "tune.jsonl")):
            break
        time.sleep(0.05)
    assert _leftover_ray(str(tmp)), "the run should have started its local cluster"
    proc.send_signal(signal.SIGKILL)          # the driver only: its local cluster's processes share its fate
    proc.wait()
    gone = time.time() + 60
    while _leftover_ray(str(tmp)) and time.time() < gone:
        time.sleep(0.2)
    left = _leftover_ray(str(tmp))
    for p in left:                            # (if any: this test started them)
        p.kill()
    assert not left, "the local cluster should die with its driver"
    done = [r["key"] for r in read_results(out / "tune.jsonl") if r.get("kind") == "setting"]
    assert 1 <= len(done) < 4, "the driver should have been killed mid-grid"
    assert not (out / "frontier.json").exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming: {len(done)} of 4 settings already done" in res.stdout
    records = read_results(out / "tune.jsonl")
    keys = [r["key"] for r in records if r.get("kind") == "setting"]
    assert len(keys) == len(set(keys)) == 4 and keys[:len(done)] == done      # nothing finished was redone
    assert sum(r.get("kind") == "reference" for r in records) == 4
    report = json.loads((out / "frontier.json").read_text())
    assert report["complete"] and report["resumed"] == len(done) and "holdout" in report["recommended"]
    assert not _leftover_ray(str(tmp)), "the local cluster should be shut down when the run ends"


def test_resources_per_setting_come_from_the_safetensors_headers():
    from acm.checkpoints.tensors import TensorReader
    from acm.tune import SettingContext
    from acm.tune_ray import OVERHEAD_BYTES, setting_resources

    with TensorReader(sorted(BASE.glob("*.safetensors"))) as r:
        params, nbytes = r.numel(), sum(r.nbytes(k) for k in r.keys())
    ctx = SettingContext(base=str(BASE), fts=(str(LONG),), rows=(), threads=None)
    assert setting_resources(ctx) == {"num_cpus": 1, "num_gpus": 0, "memory": nbytes + 4 * params + OVERHEAD_BYTES}
    on_gpus = setting_resources(ctx, cluster_gpus=4)            # no --device on a GPU cluster: one GPU per setting
    assert on_gpus == {"num_cpus": 1, "num_gpus": 1, "memory": nbytes + OVERHEAD_BYTES}
    cpu = SettingContext(base=str(BASE), fts=(str(LONG),), rows=(), device="cpu", threads=2)
    assert setting_resources(cpu, cluster_gpus=4)["num_gpus"] == 0 and setting_resources(cpu)["num_cpus"] == 2
    missing = SettingContext(base="no-such-org/no-such-model", fts=(), rows=())
    assert setting_resources(missing)["memory"] == OVERHEAD_BYTES       # unknown here: the worker resolves it
