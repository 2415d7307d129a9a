"""Per-session state (held in ``gr.State``) and the shared cache of read-only source models.

Everything a user does — chosen models, analyses, merges, chat history, evaluation points —
lives in one ``SessionState`` per browser session (or per ``gradio_client.Client``), so two users
never see each other's work. Gradio deep-copies a ``gr.State``'s initial value for every new
session; ``SessionState.__deepcopy__`` therefore hands out a *fresh, empty* session.

Shared between sessions, and only ever read: ``SOURCE_MODELS``, loaded weights of the *input*
models (base and fine-tuned) and of merged models that came from the shared cache, so that a
Space does not hold one copy of the same 7B model per visitor; and the shared result cache
(``acm.cache``, on when ``ACM_CACHE_DIR`` is set — ``python app.py`` sets a default), which holds
immutable analyses and merged-model folders keyed by content. A session that uses a cached merged
model pins it (eviction never removes it) until the session drops it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import none_if_auto, progress_callback

log = logging.getLogger("acm.app")


@dataclass
class MergedModel:
    """A finished merge: where it is on disk, how it was made, and (lazily) the loaded model."""

    merge_id: int
    label: str                      # e.g. "ACM-TIES t=4 α=1"
    out_dir: Path
    report: dict                    # MergeReport.to_dict()
    settings: dict                  # the UI settings that produced it
    lambdas: list[dict[str, float]] | None
    seconds: float
    model: Any = None
    tokenizer: Any = None
    cache: dict | None = None       # {"hit", "age_s", ...} when the folder is a shared-cache entry
    release: Callable[[], None] | None = field(default=None, repr=False)   # unpins that entry

    def drop(self) -> None:
        """Forget the loaded model and let the shared cache evict the folder again."""
        self.model = None
        self.tokenizer = None
        release, self.release = self.release, None
        if release is not None:
            release()


@dataclass
class ChatColumn:
    """One model's side of the side-by-side chat."""

    key: str                        # "merged", "base", "ft0".. (stable slot id)
    label: str
    history: list[dict] = field(default_factory=list)   # gr.Chatbot messages format
    lengths: list[int] = field(default_factory=list)    # reply lengths in tokens
    template: str = ""              # chat template + end-of-turn tokens in use (acm.checkpoints.templates.describe_chat)


class SessionState:
    """Everything one user has done in the app. Handlers mutate it in place."""

    def __init__(self) -> None:
        self._workspace: Path | None = None
        self.base: str | None = None
        self.fts: list[str] = []
        self.compat: dict | None = None
        self.analysis = None                      # acm.activations.analysis.AnalysisResult of the current models
        self.analysis_key: tuple | None = None
        self.analysis_cache: dict[tuple, Any] = {}
        self.analysis_seconds: float | None = None
        self.merged: MergedModel | None = None
        self.merge_count = 0
        self.merge_history: list[dict] = []
        self.chat: dict[str, ChatColumn] = {}
        self.eval_points: list[dict] = []         # accumulated accuracy/length points (scatter)
        self.last_eval: dict | None = None
        self.eval_cache: dict[tuple, dict] = {}   # (model, eval setting) -> result; sources run once
        self.figures: dict[str, Any] = {}         # last figures shown, for export
        # the Analyse tab's last view: the paper's rule at its t (acm.rules.PAPER_T) until the user changes it
        self.coef_view: dict = {"t": 0.7, "alpha": 1.0, "clip": None, "rule": "acm"}
        self.lock = threading.RLock()

    # gr.State deep-copies its initial value for each session: give every session a new one.
    def __deepcopy__(self, memo) -> SessionState:
        return SessionState()

    @property
    def workspace(self) -> Path:
        """A per-session temp folder for merges and exports (removed when the session ends)."""
        if self._workspace is None or not self._workspace.exists():
            self._workspace = Path(tempfile.mkdtemp(prefix="acm-session-"))
        return self._workspace

    def subdir(self, name: str) -> Path:
        path = self.workspace / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def set_merged(self, merged: MergedModel) -> None:
        """Swap in a new merged model; the previous one is freed and its folder deleted (a merged 7B
        model is ~15 GB: a session keeps one on disk). Its evaluation points stay in the scatter."""
        old = self.merged
        self.merged = merged
        if old is not None and old is not merged:
            old.drop()
            if self._workspace is not None and old.out_dir != merged.out_dir and \
                    self._workspace in Path(old.out_dir).resolve().parents:
                shutil.rmtree(old.out_dir, ignore_errors=True)

    def adopt_merged(self, merged: MergedModel, seconds: float) -> None:
        """Make ``merged`` the session's merged model and log it in the merge history (every button
        that produces a merged model ends here, so Chat / Evaluate / Export see it the same way)."""
        with self.lock:
            self.set_merged(merged)
            self.merge_history.append({"label": merged.label, **merged.settings, "seconds": round(seconds, 2),
                                       "out_dir": str(merged.out_dir)})

    def close(self) -> None:
        """Free memory and delete the workspace (Gradio calls this when the session expires)."""
        if self.merged is not None:
            self.merged.drop()
        self.merged = None
        self.analysis_cache.clear()
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None


def close_session(state: Any) -> None:
    """``gr.State(delete_callback=...)``."""
    if isinstance(state, SessionState):
        state.close()


class ModelCache:
    """A small LRU of loaded, read-only source models keyed by (path, device, dtype).

    Loading is serialised per key so that two sessions asking for the same model at the same
    time load it once.
    """

    def __init__(self, max_items: int = 4) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, loader: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = loader()
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return value

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


SOURCE_MODELS = ModelCache(max_items=4)


def source_model_key(path: str | Path, device: str | None, dtype: str | None) -> tuple:
    return (str(Path(path).resolve()) if Path(path).exists() else str(path), device or "auto", dtype or "auto")


def load_source_model(spec: str, *, device: str | None = None, dtype: str | None = None,
                      trust_remote_code: bool = False, progress=None) -> tuple[Any, Any]:
    """(model, tokenizer) of an input model, from the shared cache (loaded on first use; a Hub model's
    download reports to ``progress(fraction, message)``)."""
    from acm.checkpoints.models import load_causal_lm, parse_dtype, resolve_model

    def loader():
        src = resolve_model(spec, trust_remote_code=trust_remote_code)
        return load_causal_lm(src, device=device, dtype=parse_dtype(dtype), progress=progress)

    return SOURCE_MODELS.get(source_model_key(spec, device, dtype) + (bool(trust_remote_code),), loader)


# ----------------------------------------------------------------------------- shared result cache


def shared_cache():
    """The shared, content-addressed result cache (``acm.cache.default_store()``), or None when off.

    A cache folder that cannot be used is logged once and the app carries on without the cache:
    the cache only saves work, it must never stop it.
    """
    from acm.cache import default_store
    from acm.errors import ACMError

    try:
        return default_store()
    except (ACMError, OSError) as exc:
        global _CACHE_WARNED
        if not _CACHE_WARNED:
            _CACHE_WARNED = True
            log.warning("shared cache disabled: %s", exc)
        return None


_CACHE_WARNED = False


def reused_line(age_s: float, compute_s: float | None = None, what: str = "result") -> str:
    """'reused a result computed 2 min ago (it took 2.5 s)': how a cache hit is shown."""
    from acm.cache import describe_age

    took = f"; computing it took {compute_s:.1f} s" if compute_s else ""
    return f"reused a {what} computed {describe_age(age_s)} ago (shared cache, no model work{took})"


# ----------------------------------------------------------------------------- shared merges


def shared_merge(base: str, fts: list[str], name: str, options, lambdas, acm_info: dict | None,
                 progress: Callable[[float, str], None] | None = None) -> dict | None:
    """The merged model from the shared cache (computed once for everyone), or None when the cache is
    off or a model has no content identity. The key: model contents, every option (seed included),
    the λ used, the ACM analysis behind them (its provenance), the folder name and the code version.

    Returns ``{"out_dir", "report", "hit", "waited", "age_s", "compute_s", "release"}``; the folder
    is pinned (never evicted) until ``release()`` — the session calls it when it drops the model.
    """
    from acm.merging.engine import merge_models

    store = shared_cache()
    key = shared_merge_key(store, base, fts, name, options, lambdas, acm_info) if store is not None else None
    if key is None:
        return None
    made = {}

    def build(folder: Path) -> dict:
        made["started"] = True
        report = merge_models(base, fts, folder / name, options, lambdas=lambdas, acm=acm_info, force=True,
                              progress=progress_callback(progress, (0.0, 0.9)), show_progress=False)
        made["done"] = True
        return {"what": "merge", "name": name, "report": report.to_dict()}

    try:
        entry = store.get_or_create("merge", key, build)
    except OSError as exc:
        if made.get("started") and not made.get("done"):
            raise                                   # the merge itself failed (e.g. disk full): say so
        log.warning("shared cache unavailable for the merge (%s); merging into the session folder", exc)
        return None
    return _merge_info(entry, name, key)


def _merge_info(entry, name: str, key: str) -> dict:
    report = dict(entry.meta["report"], out_dir=str(entry.path / name))
    return {"out_dir": entry.path / name, "report": report, "hit": entry.hit, "waited": entry.waited,
            "age_s": entry.age_s, "compute_s": entry.compute_s, "key": key, "release": entry.release}


def shared_merge_key(store, base: str, fts: list[str], name: str, options, lambdas, acm_info: dict | None) -> str | None:
    """The shared-cache key of a merge (see ``shared_merge``); None when a model has no content identity."""
    from acm.cache import make_key, model_identity

    ids = [model_identity(spec, hasher=store.hasher) for spec in [base, *fts]]
    if any(i is None for i in ids):
        return None
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return make_key("merge", {"base": [base, ids[0]], "fts": [[f, i] for f, i in zip(fts, ids[1:])],
                              "options": options.to_dict(), "lambdas": lambdas, "acm": acm_info, "name": name,
                              "device": device})


def cached_merge(base: str, fts: list[str], name: str, options, lambdas, acm_info: dict | None, device: str | None,
                 dtype: str | None) -> dict | None:
    """``shared_merge``'s answer when it needs no heavy work: the entry is stored *and* its model is
    already loaded (another session uses it); else None. A light event serves such a merge; loading
    weights or merging is left to the heavy slot."""
    store = shared_cache()
    key = shared_merge_key(store, base, fts, name, options, lambdas, acm_info) if store is not None else None
    if key is None:
        return None
    try:
        entry = store.lookup("merge", key)
    except OSError:
        return None
    if entry is None:
        return None
    if merged_model_key(entry.path / name, device, dtype) not in SOURCE_MODELS:
        entry.release()
        return None
    store.record_hit()
    return _merge_info(entry, name, key)


def merged_model_key(out_dir: Path, device: str | None, dtype: str | None) -> tuple:
    return source_model_key(out_dir, none_if_auto(device), none_if_auto(dtype)) + ("merged",)


def load_merged(out_dir: Path, device: str | None, dtype: str | None, *, shared: bool):
    """(model, tokenizer) of a merged folder. A shared-cache folder is immutable, so its loaded
    weights are shared between sessions like the source models' (one copy for the whole crowd)."""
    from acm.checkpoints.models import load_causal_lm, parse_dtype, resolve_model

    def loader():
        return load_causal_lm(resolve_model(str(out_dir)), device=none_if_auto(device),
                              dtype=parse_dtype(none_if_auto(dtype)))

    if not shared:
        return loader()
    return SOURCE_MODELS.get(merged_model_key(out_dir, device, dtype), loader)


# ----------------------------------------------------------------------------- queue status

HEAVY = "heavy"


class HeavySlot:
    """The one heavy-job slot, held in process by every heavy job while it runs.

    Why: Gradio's concurrency group ``"heavy"`` (limit 1) orders the heavy *events*, but a cache hit is
    answered by a light event (``/analyse``), and that light event hands a miss over to the heavy work
    in process (an API caller has no page to chain a second event). Both kinds hold this slot, so two
    heavy jobs still never run at once on one GPU. ``waiting`` counts the in-process waiters (for the
    queue estimate).
    """

    def __init__(self):
        self._lock = threading.Lock()      # a plain Lock: a streaming job may release it from another thread
        self._guard = threading.Lock()
        self.waiting = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def acquire(self, progress: Callable[[float, str], None] | None = None) -> None:
        if self._lock.acquire(blocking=False):
            return
        with self._guard:
            self.waiting += 1
            ahead = self.waiting
        if progress is not None:
            progress(0.0, f"waiting for the heavy-job slot ({ahead} in line)")
        try:
            self._lock.acquire()
        finally:
            with self._guard:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def hold(self, progress: Callable[[float, str], None] | None = None):
        """``with HEAVY_SLOT.hold(): ...`` — the slot for the block's duration."""
        slot = self

        class _Held:
            def __enter__(self):
                slot.acquire(progress)
                return slot

            def __exit__(self, *exc):
                slot.release()

        return _Held()

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` (a plain function or a generator, e.g. a streaming tune) run while holding the slot;
        the signature is kept (Gradio reads it to inject ``gr.Progress``)."""
        import functools
        import inspect

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                with self.hold():
                    yield from fn(*args, **kwargs)
            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            with self.hold():
                return fn(*args, **kwargs)
        return plain


HEAVY_SLOT = HeavySlot()
# Answers from the caches (``light_first``'s light events): several at once, never in the heavy slot. The
# group is their own, so a light event waiting for a miss's heavy work never holds up other light events.
LIGHT_GROUP, LIGHT_LIMIT = "cache-hits", 16


class SameRequests:
    """Identical light requests at the same moment: the first looks the result up (and, on a miss, computes
    it in the heavy slot); the others wait for that one and then look it up themselves.

    Why: without this, every copy that missed before the first one's computation began queued for the heavy
    slot, then read the stored result one at a time, each behind whatever other heavy job (a merge) was in
    line by then — a cache hit waiting for someone else's merge."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, list] = {}     # request key -> [lock, users]

    @contextlib.contextmanager
    def first_or_wait(self, key: Hashable):
        """Yields True to the first request for ``key`` (holding it until the block ends), False to one that
        arrived while it was held, after it ended."""
        with self._guard:
            record = self._locks.setdefault(key, [threading.Lock(), 0])
            record[1] += 1
        lock = record[0]
        first = lock.acquire(blocking=False)
        try:
            if not first:
                with lock:
                    pass
            yield first
        finally:
            if first:
                lock.release()
            with self._guard:
                record[1] -= 1
                if record[1] == 0:
                    self._locks.pop(key, None)


SAME_REQUESTS = SameRequests()


def same_request_key(kind: str, request: dict[str, Any]) -> str:
    """``SameRequests``' key of a request: its kind and the arguments its result depends on, as text (the
    session and the progress callback left out)."""
    return f"{kind}:" + repr(sorted((k, v) for k, v in request.items() if k not in ("state", "progress")))


class SharedMemo:
    """A bounded memo (least recently used out) whose entry is computed once even when many sessions ask
    for it at the same moment. Why: a crowd that just got one fresh analysis draws the same views at the
    same instant; a plain memo lets each of them miss and compute the same figure (12 × the work, under
    one interpreter lock)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._flights = SameRequests()

    def _get(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True, self._items[key]
        return False, None

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value for ``key``: memoised, or computed now (by the first asker; the others wait for it)."""
        found, value = self._get(key)
        if found:
            return value
        with self._flights.first_or_wait(key):
            found, value = self._get(key)           # computed by the one this request waited for
            if found:
                return value
            value = compute()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return value


def serve_light(lookup: Callable[[], Any], heavy: Callable[[], Any], render: Callable[[Any], Any],
                progress: Callable[[float, str], None] | None = None, request_key: str | None = None) -> Any:
    """A light event's answer: ``render(lookup())`` when the caches hold the result (no heavy slot), else
    the heavy work in the heavy slot — after checking again, as the job it waited for may have been
    this very request. ``request_key`` (what the result depends on): of identical requests that miss
    together, one computes and the rest wait for it, not for the heavy slot."""
    found = lookup()
    if found is None:
        same = SAME_REQUESTS.first_or_wait(request_key) if request_key else contextlib.nullcontext(True)
        with same as first:
            if not first:
                found = lookup()                    # what the first one stored (None if it failed)
            if found is None:
                with HEAVY_SLOT.hold(progress):
                    found = lookup()
                    if found is None:
                        return heavy()
    return render(found)


def light_first(ui: Any, button: Any, inputs: list, outputs: list, *, hit: Callable[..., bool], light: Callable,
                heavy: Callable, api_name: str, what: str, show_progress_on: list) -> tuple[Any, Any]:
    """Wire ``button`` as: a check of the caches (no queue) → the light event (``api_name``, public, its own
    concurrency group) on a hit, or the heavy event (``<api_name>_heavy``, private, the "heavy" group, with
    Gradio's queue position and ETA) on a miss. ``hit(*values)`` answers from the caches only; a miss is
    checked against the queue first (``admit``). Returns (light event, heavy event).

    Why two hidden counters: Gradio chains run in the page, so the page picks the branch — each counter's
    ``change`` starts one event, and the check bumps one of them.
    """
    import gradio as gr

    on_hit = gr.Number(0, visible=False, elem_id=f"{api_name}-hit")
    on_miss = gr.Number(0, visible=False, elem_id=f"{api_name}-miss")

    def route(*values):
        *args, n_hit, n_miss = values
        if hit(*args):
            return (n_hit or 0) + 1, gr.skip()
        admit(ui.demo, what)
        return gr.skip(), (n_miss or 0) + 1

    route.__name__ = f"route_{api_name}"
    from components.common import ui_errors

    button.click(ui_errors(route, warm=False), [*inputs, on_hit, on_miss], [on_hit, on_miss], queue=False,
                 api_visibility="private", show_progress="hidden")
    light_event = on_hit.change(ui_errors(light), inputs, outputs, api_name=api_name, concurrency_id=LIGHT_GROUP,
                                concurrency_limit=LIGHT_LIMIT, show_progress_on=show_progress_on)
    heavy_event = on_miss.change(ui_errors(heavy), inputs, outputs, api_name=f"{api_name}_heavy",
                                 api_visibility="private", concurrency_id=HEAVY, concurrency_limit=1,
                                 show_progress_on=show_progress_on)
    return light_event, heavy_event


def hold_heavy_slot(demo: Any, slot: HeavySlot = HEAVY_SLOT) -> int:
    """Make every event of the ``"heavy"`` concurrency group hold ``slot`` while it runs (once per
    function); returns how many were wrapped. Called by ``app.create_app`` after the wiring, so a
    heavy event added later is covered without its module knowing about the slot."""
    n = 0
    for block_fn in getattr(demo, "fns", {}).values():
        fn = getattr(block_fn, "fn", None)
        if getattr(block_fn, "concurrency_id", None) != HEAVY or fn is None or getattr(fn, "_holds_heavy", False):
            continue
        block_fn.fn = slot.wrap(fn)
        block_fn.fn._holds_heavy = True
        n += 1
    return n


def queue_status(demo: Any, concurrency_id: str = HEAVY) -> dict:
    """Where the queue stands now: waiting jobs (all and in ``concurrency_id``), running ones, the
    mean run time Gradio measured for them, an estimated wait, and the queue's bound.

    Reads Gradio's queue (``Blocks._queue``: per-group event queues and per-function run times);
    if that ever changes shape, the estimate is simply unknown (None) and admission falls back to
    Gradio's own bound.
    """
    out = {"total": 0, "max_size": None, "waiting": 0, "running": 0, "avg_s": None, "eta_s": None}
    try:
        q = demo._queue
        out["max_size"] = q.max_size
        out["total"] = len(q)
        group = q.event_queue_per_concurrency_id.get(concurrency_id)
        if group is None:
            return out
        out["waiting"] = len(group.queue) + HEAVY_SLOT.waiting     # + light events handing a miss over
        out["running"] = max(int(group.current_concurrency), int(HEAVY_SLOT.busy))
        times = [pt.avg_time for fn, pt in q.process_time_per_fn.items()
                 if getattr(fn, "concurrency_id", None) == concurrency_id and pt.count]
        if times:
            out["avg_s"] = sum(times) / len(times)
            limit = group.concurrency_limit or 1
            out["eta_s"] = (out["waiting"] + out["running"]) * out["avg_s"] / limit
    except Exception:  # an estimate only
        log.debug("queue status unavailable", exc_info=True)
    return out


def admission(demo: Any, what: str, *, margin: int = 2) -> tuple[str, str] | None:
    """("refuse", line) when the queue is (about to be) full, ("info", where you stand) or None.

    Why before queuing: Gradio refuses a full queue with a generic "busy" message; checking first
    lets us say how long the line is and when to come back. ``margin`` leaves room for events that
    pass the check at the same moment (Gradio's own bound stays the hard limit).
    """
    st = queue_status(demo)
    eta = st["eta_s"]
    wait = f"about {_duration(eta)}" if eta is not None else "a little while"
    if st["max_size"] is not None and st["total"] >= st["max_size"] - margin:
        retry = _duration(max(30.0, eta or 60.0))
        return ("refuse", (f"The queue is full ({st['total']} jobs waiting, {wait} of work ahead): {what} was not "
                           f"started. Please try again in {retry}."))
    if st["waiting"] + st["running"] > 0:
        n = st["waiting"] + 1
        return ("info", (f"{what.capitalize()}: you are number {n} in line for the heavy-job slot; "
                         f"estimated wait {wait}."))
    return None


def _duration(seconds: float) -> str:
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{max(1, round(s))} s"
    return f"{round(s / 60)} min"


def admit(demo: Any, what: str) -> None:
    """Before a heavy job is queued: refuse with a clear line (and when to retry) if the queue is
    full, or say where the visitor stands in line (a toast) when others are ahead."""
    verdict = admission(demo, what)
    if verdict is None:
        return
    import gradio as gr

    kind, line = verdict
    if kind == "refuse":
        raise gr.Error(line, print_exception=False)
    gr.Info(line)
