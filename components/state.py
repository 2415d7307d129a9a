"""Per-session state (held in ``gr.State``) and the shared cache of read-only source models.

Everything a user does — chosen models, analyses, merges, chat history, evaluation points —
lives in one ``SessionState`` per browser session (or per ``gradio_client.Client``), so two users
never see each other's work. Gradio deep-copies a ``gr.State``'s initial value for every new
session; ``SessionState.__deepcopy__`` therefore hands out a *fresh, empty* session.

The only thing shared between sessions is ``SOURCE_MODELS``: loaded weights of the *input*
models (base and fine-tuned), which are never modified, so that a Space does not hold one copy
of the same 7B model per visitor. Merged models are per session.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


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


@dataclass
class ChatColumn:
    """One model's side of the side-by-side chat."""

    key: str                        # "merged", "base", "ft0".. (stable slot id)
    label: str
    history: list[dict] = field(default_factory=list)   # gr.Chatbot messages format
    lengths: list[int] = field(default_factory=list)    # reply lengths in tokens
    template: str = ""              # chat template + end-of-turn tokens in use (acm.templates.describe_chat)


class SessionState:
    """Everything one user has done in the app. Handlers mutate it in place."""

    def __init__(self) -> None:
        self._workspace: Path | None = None
        self.base: str | None = None
        self.fts: list[str] = []
        self.compat: dict | None = None
        self.analysis = None                      # acm.analysis.AnalysisResult of the current models
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
        self.coef_view: dict = {"t": 0.0, "alpha": 1.0, "clip": None}
        self.lock = threading.RLock()

    # gr.State deep-copies its initial value for each session: give every session a new one.
    def __deepcopy__(self, memo) -> "SessionState":
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
            old.model = None
            old.tokenizer = None
            if self._workspace is not None and old.out_dir != merged.out_dir and \
                    self._workspace in Path(old.out_dir).resolve().parents:
                shutil.rmtree(old.out_dir, ignore_errors=True)

    def close(self) -> None:
        """Free memory and delete the workspace (Gradio calls this when the session expires)."""
        if self.merged is not None:
            self.merged.model = None
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
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of an input model, from the shared cache (loaded on first use)."""
    from acm.models import load_causal_lm, parse_dtype, resolve_model

    def loader():
        src = resolve_model(spec, trust_remote_code=trust_remote_code)
        return load_causal_lm(src, device=device, dtype=parse_dtype(dtype))

    return SOURCE_MODELS.get(source_model_key(spec, device, dtype) + (bool(trust_remote_code),), loader)
