"""Tuning on a Ray cluster: each setting of a grid is one Ray task (``acm tune --executor ray``).

Why: one setting of a 7B pair is a 15 GB merge plus a sampled evaluation — tens of GPU-minutes — so a grid
on one machine takes a day; the settings are independent, and Ray (what mergekit's evolutionary merging
uses) already schedules, places and retries such tasks. ``RayExecutor`` is an ``acm.tune.Executor``: the
run itself (references, tune.jsonl, resume, frontier, held-out check) stays in ``acm.tune``; only the
"one setting → result dict" step (``acm.tune.run_setting``) runs on the workers, each merging into its own
temporary folder, evaluating and removing the merge, so only the result dict travels back.

Ray is optional (``pip install .[ray]`` or ``-r requirements-ray.txt``): nothing imports it until a
``RayExecutor`` starts. Without an address it starts a private local cluster (node address 127.0.0.1 asked —
Ray still listens on all interfaces, behind its token authentication; no dashboard; logs in a temporary folder)
and shuts it down on ``close()``; with one it connects to a running cluster,
whose nodes need this package installed and the models at a path they all see (or in their Hub cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from acm.errors import InputError, first_line
from acm.sizes import format_bytes
from acm.tune import Setting, SettingContext, run_setting

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_RETRIES = 2              # a setting whose worker dies is run again at most this often, then recorded failed
OVERHEAD_BYTES = 1 << 30             # Python, torch and transformers in a worker, besides the weights
LOCAL_OBJECT_STORE = 256 << 20       # the local cluster's shared memory: only options and result dicts go through it
INSTALL_HINT = "pip install 'acm-merge-explorer[ray]' (or pip install -r requirements-ray.txt)"


def import_ray():
    """``ray``, or one InputError line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def weight_facts(spec: str) -> tuple[int, int]:
    """(parameters, bytes on disk) of a model from its safetensors headers (no weights read); (0, 0) when the
    model cannot be resolved here (a Hub id not in this machine's cache: the workers resolve it themselves)."""
    from acm.checkpoints.models import resolve_model
    from acm.checkpoints.tensors import TensorReader

    try:
        src = resolve_model(spec)
        reader = TensorReader(src.weight_files, src.weight_format)
    except Exception:  # noqa: BLE001 - any failure here only means "size unknown"; the worker reports real errors
        return 0, 0
    try:
        return reader.numel(), sum(reader.nbytes(k) for k in reader.keys())
    finally:
        reader.close()


def setting_resources(ctx: SettingContext, *, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """The Ray resources one setting asks for, from the base model's safetensors headers.

    * ``num_cpus``: the run's torch threads (1 when unset: the demo-size default of ``acm.tune.auto_threads``).
    * ``num_gpus``: 1 when the setting evaluates on a GPU (``--device cuda…``, or no ``--device`` and the cluster
      has GPUs), else 0 — one merged model per GPU.
    * ``memory`` (host bytes): the weights once (the merge streams tensors; its output shards pass through the
      page cache), plus the merged model in float32 for a CPU evaluation (4 bytes per parameter; on a GPU it
      lives in GPU memory), plus ``OVERHEAD_BYTES``. Ray uses it to place tasks, it does not enforce it.
    """
    params, nbytes = weight_facts(ctx.base)
    device = (ctx.device or "").lower()
    gpu = device.startswith("cuda") or (not device and cluster_gpus > 0)
    memory = nbytes + (0 if gpu else 4 * params) + OVERHEAD_BYTES
    return {"num_cpus": max(1, int(ctx.threads or 1)), "num_gpus": 1 if gpu else 0, "memory": int(memory)}


def setting_task(ctx: SettingContext, setting: dict) -> dict:
    """What a Ray worker runs: ``run_setting`` in the worker's own temporary folder, plus how many attempts it
    took (Ray runs a setting again when its worker died)."""
    res = run_setting(ctx, setting)
    res["attempts"] = _attempt() + 1
    return res


def warm_up() -> None:
    """Import what ``run_setting`` needs, so a fresh worker's first setting does not pay for it."""
    import importlib

    for name in ("acm.merging.engine", "acm.evaluation.evaluate", "transformers.models.auto.modeling_auto"):
        importlib.import_module(name)


def _attempt() -> int:
    """This task's retry number (0 on the first run). Ray has no public call for it; 0 if the private one moves."""
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - a missing private API only loses the attempt count
        return 0


class RayExecutor:
    """Runs a tune's settings as Ray tasks and yields their results in completion order (``acm.tune.Executor``).

    ``address``: a running cluster (``ray://…`` or ``host:port``); None starts a local one with ``num_cpus``
    CPUs (default: this machine's) for as long as the executor is open. ``max_retries``: how often Ray runs a
    setting again when its worker process or node dies; a setting that raises is not retried (it would fail
    again) but recorded as failed with its reason. Use as a context manager, or call ``close()``.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, poll_seconds: float = 0.5):
        if max_retries < 0:
            raise InputError(f"--max-retries must be >= 0, got {max_retries}")
        if num_cpus is not None and num_cpus < 1:
            raise InputError(f"--ray-cpus must be at least 1, got {num_cpus}")
        self.address, self.num_cpus, self.max_retries, self.poll_seconds = address, num_cpus, max_retries, poll_seconds
        self._ray = None
        self._owns = False
        self._tmp: str | None = None
        self._warming: list = []

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self):
        """Connect to the cluster (or start the local one) once; returns the ``ray`` module."""
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            self._init(ray)
            self._owns = True
        self._ray = ray
        return ray

    def _init(self, ray) -> None:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                  "runtime_env": {"env_vars": {"PYTHONPATH": path}}}   # workers import this acm, wherever it is
        if self.address:
            try:
                ray.init(address=self.address, **common)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError here
                raise InputError(f"cannot reach the Ray cluster at {self.address!r}: {first_line(exc)}") from None
            return
        self._tmp = tempfile.mkdtemp(prefix="acm-ray-")
        cpus = self.num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", _temp_dir=self._tmp,
                 object_store_memory=LOCAL_OBJECT_STORE, **common)
        # Each worker imports torch + transformers once (seconds on a busy machine): start that now, while the
        # driver evaluates the base and fine-tuned models, not when the first settings arrive.
        warm = ray.remote(warm_up).options(num_cpus=1, max_retries=0)
        self._warming = [warm.remote() for _ in range(int(cpus))]

    def close(self) -> None:
        """Shut the local cluster down (or disconnect from a running one) if this executor started Ray."""
        if self._ray is not None and self._owns:
            for ref in self._warming:
                with contextlib.suppress(Exception):
                    self._ray.cancel(ref, force=True)
            self._ray.shutdown()
        self._ray, self._owns, self._warming = None, False, []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def task_options(self, ctx: SettingContext) -> dict[str, Any]:
        """``setting_resources`` checked against the cluster (one line when a setting can never be placed)."""
        ray = self.start()
        have = ray.cluster_resources()
        opts = setting_resources(ctx, cluster_gpus=float(have.get("GPU", 0)))
        if opts["num_gpus"] > have.get("GPU", 0):
            raise InputError(f"--device {ctx.device} asks for a GPU per setting, but the Ray cluster has none")
        if opts["memory"] > have.get("memory", opts["memory"]):
            raise InputError(f"one setting needs about {format_bytes(opts['memory'])} of memory, more than the Ray "
                             f"cluster has ({format_bytes(int(have['memory']))})")
        if opts["num_cpus"] > have.get("CPU", 0):
            raise InputError(f"one setting asks for {opts['num_cpus']} CPUs (--threads), more than the Ray cluster "
                             f"has ({have.get('CPU', 0):g})")
        return opts

    def run(self, ctx: SettingContext, settings: Sequence[Setting], where: Path, stop: Callable[[], str | None], *,
            keep: bool = False) -> Generator[tuple[Setting, dict], None, str | None]:
        """Submit every setting at once, yield each result as its task finishes; ``stop()`` is polled every
        ``poll_seconds``. On a stop, an error or when the consumer closes this generator (Ctrl-C, a cancelled
        UI job), the tasks still queued or running are cancelled."""
        if keep:
            raise InputError("--keep keeps every merge under OUT, which only the local executor writes to")
        if not settings:
            return None
        ray = self.start()
        task = ray.remote(setting_task).options(**self.task_options(ctx), max_retries=self.max_retries,
                                                retry_exceptions=False)
        ctx_ref = ray.put(ctx)
        pending = {task.remote(ctx_ref, s.to_dict()): s for s in settings}
        try:
            while pending:
                reason = stop()
                if reason:
                    return reason
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds)
                for ref in ready:
                    yield pending.pop(ref), self._result(ray, ref)
            return None
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def _result(self, ray, ref) -> dict:
        """The task's result dict, or ``{"failed": reason, "attempts": n}``."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:      # the setting itself raised: retrying would not help
            cause = getattr(exc, "cause", None) or exc
            return {"failed": f"{type(cause).__name__}: {first_line(cause)}", "attempts": 1}
        except ray.exceptions.RayError as exc:          # its worker / node died on every attempt, or it was cancelled
            return {"failed": f"the worker died on each of {self.max_retries + 1} attempt(s): "
                              f"{type(exc).__name__}: {first_line(exc)}", "attempts": self.max_retries + 1}
