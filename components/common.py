"""Small helpers every panel shares: asset paths, labels, error translation, GPU decorator, progress.

Nothing here does maths; it only adapts the library (`acm/`) to Gradio's conventions.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acm.sizes import format_bytes

log = logging.getLogger("acm.app")

REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    """The bundled assets (demo models, calibration, eval sets); ``ACM_ASSETS_DIR`` overrides."""
    return Path(os.environ.get("ACM_ASSETS_DIR") or REPO_ROOT / "assets")


def demo_models_dir() -> Path:
    return assets_dir() / "demo-models"


def bundled_calibration() -> Path:
    return assets_dir() / "calibration" / "demo_calibration.jsonl"


def bundled_eval() -> Path:
    return assets_dir() / "eval" / "demo_eval.jsonl"


def short_name(spec: str | os.PathLike | None) -> str:
    """A readable label for a model spec: the folder name for paths, the id for Hub models."""
    if spec is None:
        return "?"
    s = str(spec).rstrip("/\\")
    if os.path.sep in s and (os.path.isabs(s) or os.path.exists(s)):
        return Path(s).name
    return s


def unique_labels(specs: list[str]) -> list[str]:
    """Short labels, disambiguated when two models share a folder name."""
    labels = [short_name(s) for s in specs]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        if labels.count(lab) > 1:
            seen[lab] = seen.get(lab, 0) + 1
            lab = f"{lab} ({seen[lab]})"
        out.append(lab)
    return out


def as_list(value: Any) -> list[str]:
    """Dropdown values arrive as a str, a list or None; always give a clean list of strings."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def none_if_auto(value: str | None) -> str | None:
    return None if value in (None, "", "auto") else value


def optional_float(value: Any) -> float | None:
    """Blank Number boxes arrive as None (or NaN); keep them as 'not set'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "-")):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        from acm.errors import InputError

        raise InputError(f"not a number: {value!r} (leave the box empty for no clipping)") from None
    return None if value != value else value  # NaN -> None


# ----------------------------------------------------------------------------- imports

_IMPORT_LOCK = threading.Lock()
_IMPORTED = threading.Event()


def warm_imports(specs: tuple | list = ()) -> None:
    """Import the heavy stack once, in one thread at a time.

    transformers resolves its classes lazily, and two threads doing that for the first time at
    once (a page-load check, the chat preloader, an analysis) can fail with ``ImportError: cannot
    import name 'AutoConfig'``. Every handler calls this first; after the first run it is a flag
    check. ``specs`` also resolves those models' architecture classes.
    """
    if _IMPORTED.is_set() and not specs:
        return
    with _IMPORT_LOCK:
        if not _IMPORTED.is_set():
            import torch  # noqa: F401
            import transformers
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, TextIteratorStreamer  # noqa: F401

            import acm.activations.analysis
            import acm.activations.calibration
            import acm.checkpoints.models  # noqa: F401
            del transformers
            _IMPORTED.set()
        for spec in specs:
            try:
                from transformers import AutoConfig, AutoModelForCausalLM

                config = AutoConfig.from_pretrained(spec)
                AutoModelForCausalLM._model_mapping[type(config)]   # imports the modeling module
            except Exception:  # noqa: BLE001 - only a warm-up; real errors surface when used
                pass


# ----------------------------------------------------------------------------- errors


def _one_line(text: str) -> str:
    """Hub tokens masked, whitespace (newlines included) collapsed: a toast is one readable line."""
    from acm.errors import redact

    return " ".join(redact(str(text)).split())


def _translate(exc: BaseException):
    """An exception as a readable one-line gr.Error (library errors keep their own message)."""
    import traceback

    import gradio as gr

    from acm.errors import OOM_ADVICE, ACMError, first_line, is_out_of_memory, redact

    if isinstance(exc, gr.Error):
        exc.message = _one_line(exc.message)
        return exc
    if isinstance(exc, ACMError):
        return gr.Error(_one_line(str(exc)), print_exception=False)
    if is_out_of_memory(exc):
        return gr.Error(f"out of memory: {OOM_ADVICE} (the batch size is under “Advanced analysis settings”)",
                        print_exception=False)
    # The server log keeps the traceback for the operator, with any token masked.
    log.error("unexpected error in the app:\n%s",
              redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
    first = first_line(exc)
    return gr.Error(_one_line(f"unexpected {type(exc).__name__}: {first}" if first else
                              f"unexpected {type(exc).__name__}"), print_exception=False)


def ui_errors(fn: Callable, *, warm: bool = True) -> Callable:
    """Wrap an event handler so failures reach the user as one readable line, never a traceback.

    Keeps the wrapped signature (Gradio reads it to inject ``gr.Progress``) and works for plain
    functions and generators (streaming handlers). ``warm=False`` skips ``warm_imports`` for
    handlers that never touch transformers (the Check button: configs as JSON, safetensors headers),
    so they answer in milliseconds instead of waiting seconds for the heavy imports.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                if warm:
                    warm_imports()
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure becomes one gr.Error line (_translate)
                raise _translate(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if warm:
                warm_imports()
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one gr.Error line (_translate)
            raise _translate(exc) from None
    return wrapper


def warn(message: str) -> None:
    """A non-blocking toast in the UI (no-op outside a Gradio request, e.g. in unit tests)."""
    try:
        import gradio as gr

        gr.Warning(message)
    except Exception:  # noqa: BLE001 - outside an event gr.Warning raises; the log still gets it
        log.warning(message)


def info(message: str) -> None:
    try:
        import gradio as gr

        gr.Info(message)
    except Exception:  # noqa: BLE001 - outside an event gr.Info raises; the log still gets it
        log.info(message)


# ----------------------------------------------------------------------------- uploads + file names

UPLOAD_ROOTS_ENV = "ACM_UPLOAD_ROOTS"     # extra folders (os.pathsep-separated) uploads may come from


def upload_roots() -> list[Path]:
    """Where uploaded files may live: Gradio's upload folder (``GRADIO_TEMP_DIR`` or <tmp>/gradio),
    plus any folder an operator lists in ``ACM_UPLOAD_ROOTS``."""
    from gradio.utils import get_upload_folder

    roots = [Path(get_upload_folder())]
    roots += [Path(p) for p in os.environ.get(UPLOAD_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(os.path.realpath(r)) for r in roots]


def uploaded_file(path: str | os.PathLike | None, what: str = "file") -> Path:
    """The real path of an uploaded file, refused unless it is a regular file inside the upload area.

    Why: handlers receive a *path string*; via the API a caller could send ``../../etc/passwd`` or
    an absolute path of the server. Only files Gradio itself stored for an upload are read, so the
    upload boxes cannot be used to read anything else on the machine.
    """
    from acm.errors import InputError

    if path is None or not str(path).strip():
        raise InputError(f"no {what} uploaded")
    raw = str(path)
    shown = safe_filename(Path(raw).name) or "(unnamed)"
    if "\x00" in raw or ".." in Path(raw).parts:
        raise InputError(f"refusing {what} {shown!r}: its path contains '..'; upload the file instead")
    real = Path(os.path.realpath(raw))
    if not any(real == root or root in real.parents for root in upload_roots()):
        raise InputError(f"refusing {what} {shown!r}: it is not a file uploaded to this app; upload it instead")
    if not real.is_file():
        raise InputError(f"the uploaded {what} {shown!r} is gone or is not a regular file; upload it again")
    return real


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "file", max_len: int = 120) -> str:
    """A file name safe to create anywhere: no folders, no leading dots, only ``[A-Za-z0-9._-]``.

    Why: names of exported files are built from labels and folder names; none of them may climb
    out of the export folder (``../``), be absolute, hidden, or carry shell/HTML metacharacters.
    """
    base = str(name).replace("\\", "/").split("/")[-1]
    cleaned = _UNSAFE_CHARS.sub("_", base).strip("._-")[:max_len].strip("._-")
    return cleaned or default


# ----------------------------------------------------------------------------- GPU + progress


# ZeroGPU: ``spaces.GPU(duration=N)`` reserves N seconds (default 60) and aborts the call when they run out;
# ``duration`` may also be a callable taking the decorated function's arguments and returning seconds
# (a "dynamic duration"). A shorter request queues sooner, and a request above the visitor's per-call cap
# is refused, so each job asks for what its size needs, within [GPU_MIN_SECONDS, GPU_MAX_SECONDS].
GPU_MIN_SECONDS = 30
GPU_MAX_SECONDS = int(os.environ.get("ACM_GPU_MAX_DURATION", "900"))
# Conservative throughputs for sizing (one ZeroGPU H200 slice, bfloat16, small batches with hooks):
_GPU_FLOPS = 5e13          # effective FLOP/s of a forward pass
_LOAD_BYTES_PER_S = 1e9    # weights from the local cache into GPU memory
_MERGE_BYTES_PER_S = 5e8   # streamed merge: inputs read + output written, per second
_JOBS = {"analyse": "analysis", "analyze": "analysis", "merge": "merge"}


def model_bytes(spec: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(parameters, bytes in bfloat16) of a model from its config + safetensors headers (no weights)."""
    from acm.checkpoints.models import resolve_model

    src = resolve_model(str(spec), trust_remote_code=trust_remote_code)
    n = src.reader.numel()
    return n, 2 * n


def estimate_gpu_seconds(job: str, base: str | None, fts, *, samples: int | None = None, max_tokens: int | None = None,
                         method: str | None = None, trim_scope: str | None = None, fraction: float | None = None,
                         trust_remote_code: bool = False) -> int:
    """Seconds of GPU time a job needs, from its size: the models' parameter counts (safetensors
    headers) and, for an analysis, the calibration tokens.

    analysis: load each model once (bfloat16) and run 2·P FLOPs per token and model over
    ``samples × max_tokens`` tokens, plus the base's embedding pass over the k-means candidates
    (``samples / fraction`` texts, at most 10×); merge: read every input, write one model, load the
    merged model for chat (TIES/DARE: one more pass over the inputs; global trim: three). Then ×1.5 and
    +20 s of fixed cost, clamped to [GPU_MIN_SECONDS, GPU_MAX_SECONDS]. A 7B pair with 100 samples of
    512 tokens comes to ~350 s: far past ZeroGPU's default 60 s.
    """
    specs = [s for s in [base, *as_list(fts)] if s]
    sizes = [model_bytes(s, trust_remote_code) for s in specs]
    params = [p for p, _ in sizes]
    nbytes = sum(b for _, b in sizes)
    if job == "analysis":
        tokens = max(1, int(samples or 16)) * max(1, int(max_tokens or 128))
        candidates = min(10.0, 1.0 / max(float(fraction or 0.1), 0.1))
        flops = sum(2 * p * tokens for p in params) + 2 * (params[0] if params else 0) * tokens * candidates
        seconds = nbytes / _LOAD_BYTES_PER_S + flops / _GPU_FLOPS
    elif job == "merge":
        passes = 1 + (method in ("ties", "dare_ties")) * (2 if trim_scope == "global" else 1)
        out = sizes[0][1] if sizes else 0
        seconds = (passes * nbytes + out) / _MERGE_BYTES_PER_S + out / _LOAD_BYTES_PER_S
    else:
        raise ValueError(f"no GPU time estimate for job {job!r}")
    return int(max(GPU_MIN_SECONDS, min(GPU_MAX_SECONDS, 1.5 * seconds + 20)))


def _dynamic_duration(fn: Callable, job: str, fallback: int) -> Callable[..., int]:
    """A ``spaces.GPU`` duration callable for ``fn``: the job's estimate from the call's own arguments
    (``base``, ``fts``, ``samples``, ``max_tokens``, ``method``, …), or ``fallback`` when it cannot tell."""
    sig = inspect.signature(fn)

    def duration(*args, **kwargs) -> int:
        try:
            bound = sig.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            base = a.get("base") or getattr(a.get("state"), "base", None)
            fts = a.get("fts") or getattr(a.get("state"), "fts", None)
            if not base or not fts:
                return fallback
            return estimate_gpu_seconds(job, base, fts, samples=a.get("samples"), max_tokens=a.get("max_tokens"),
                                        fraction=a.get("fraction"), method=a.get("method"),
                                        trim_scope=a.get("trim_scope"), trust_remote_code=bool(a.get("trust")))
        except Exception:  # noqa: BLE001 - sizing must never break the call; the fixed duration applies
            return fallback
    return duration


def gpu(duration: int | Callable[..., int] = 120, *, job: str | None = None) -> Callable[[Callable], Callable]:
    """``spaces.GPU`` on Hugging Face ZeroGPU Spaces when the package is importable, else a no-op.

    ``duration``: seconds, or a callable with the function's arguments (spaces' dynamic duration).
    ``job`` (``"analysis"`` / ``"merge"``; inferred from a function named ``analyse`` / ``merge``)
    sizes the request from the call's models and settings (``estimate_gpu_seconds``), with the fixed
    ``duration`` as the fallback when the size cannot be read.
    """
    try:
        import spaces  # type: ignore
    except Exception:  # noqa: BLE001 - ImportError, or not on a Space
        return lambda fn: fn

    def decorate(fn: Callable) -> Callable:
        kind = job or _JOBS.get(getattr(fn, "__name__", ""))
        wanted = duration if (callable(duration) or kind is None) else _dynamic_duration(fn, kind, int(duration))
        try:
            return spaces.GPU(duration=wanted)(fn)
        except Exception:  # noqa: BLE001 - not on a Space (or an old spaces without dynamic durations)
            return fn
    return decorate


def progress_callback(progress: Any, span: tuple[float, float] = (0.0, 1.0)) -> Callable[[float, str], None] | None:
    """Adapt a ``gr.Progress`` (or any ``(fraction, desc=)`` callable) to the library's
    ``progress(fraction, description)`` protocol, mapped into ``span`` of the bar."""
    if progress is None:
        return None
    lo, hi = span

    def cb(fraction: float, desc: str = "") -> None:
        try:
            progress(lo + (hi - lo) * max(0.0, min(1.0, float(fraction))), desc=desc)
        except Exception:  # noqa: BLE001 - a progress bar must never break the job
            pass
    return cb


def device_summary() -> str:
    """One line on where heavy work runs (imports torch only: the page shows it while loading)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = format_bytes(torch.cuda.get_device_properties(0).total_memory)
        return f"GPU: **{name}** ({mem}) · default dtype bfloat16/float16"
    return f"CPU only ({os.cpu_count()} cores) · default dtype float32 · fine for the demo models"


# ----------------------------------------------------------------------------- merge labels


def merge_label(method: str, use_acm: bool, t: float | None, alpha: float, merge_id: int, metric: str | None = None,
                *, rule: str = "acm", against: str = "fine-tuned", applies: str = "task-vectors") -> str:
    """The merged model's name in every tab: ``#3 ACM-TIES t=0.7`` (the paper's rule, Eq. 3: no α),
    ``#3 ACM-TIES t=0.7 vs merged · merged delta α=0.7`` (its staged variants), ``#3 TIES softmax t=1 α=0.7``
    (this project's rule; ``by CKA`` when a metric other than NMI drove λ), ``#3 TIES α=0.7`` (plain).

    Here rather than in components.merge because the Merge button and the staged variants
    (components.rules) both name their merges.
    """
    from acm.merging.methods import SPECS

    short = SPECS[method].short if method in SPECS else method
    if method == "linear":
        return f"#{merge_id} Linear"
    if not use_acm:
        return f"#{merge_id} {short} α={alpha:g}"
    if rule == "acm":
        variant = []
        if against != "fine-tuned":
            variant.append(f"vs {against}")
        if applies != "task-vectors":
            variant.append(applies.replace("-", " "))
        extra = (" " + " · ".join(variant)) if variant else ""
        return f"#{merge_id} ACM-{short} t={t:g}{extra}" + (f" α={alpha:g}" if applies != "task-vectors" else "")
    if rule == "fim":
        return f"#{merge_id} FIM-{short} t={t:g}"
    by = ""
    if metric and metric != "nmi":
        from acm.activations.similarity import metric_label

        by = f" by {metric_label(metric)}"
    return f"#{merge_id} {short} softmax t={t:g} α={alpha:g}{by}"


# ----------------------------------------------------------------------------- t slider


def t_slider(*args, **kwargs):
    """A ``gr.Slider`` for t whose range follows the chosen rule in the page, while the server accepts any
    number and leaves the range check to the rule (``acm.rules.check_t``).

    Why: Gradio checks a slider's value against the range it was built with before a handler runs, so with
    the paper's rule's [−3, 3] on screen an API call for the softmax rule at t = 20 was refused with
    "Value 20 is greater than maximum value 3" instead of reaching the rule, which knows each range and
    says how to ask for the other rule. (An instance method, not a subclass: Gradio writes a ``.pyi``
    stub next to the module of every component subclass.)
    """
    import types

    import gradio as gr

    def preprocess(self, payload):
        try:
            return payload if payload is None else float(payload)
        except (TypeError, ValueError):
            raise gr.Error(f"t must be a number, got {payload!r}", print_exception=False) from None

    slider = gr.Slider(*args, **kwargs)
    slider.preprocess = types.MethodType(preprocess, slider)
    return slider
