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
from pathlib import Path
from typing import Any, Callable

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
            from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,  # noqa: F401
                                      PreTrainedTokenizerFast, TextIteratorStreamer)

            import acm.analysis  # noqa: F401
            import acm.calibration  # noqa: F401
            import acm.coefficients  # noqa: F401
            import acm.evaluate  # noqa: F401
            import acm.generation  # noqa: F401
            import acm.merge  # noqa: F401
            import acm.models  # noqa: F401
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


def ui_errors(fn: Callable) -> Callable:
    """Wrap an event handler so failures reach the user as one readable line, never a traceback.

    Keeps the wrapped signature (Gradio reads it to inject ``gr.Progress``) and works for plain
    functions and generators (streaming handlers).
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                warm_imports()
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise _translate(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            warm_imports()
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc) from None
    return wrapper


def warn(message: str) -> None:
    """A non-blocking toast in the UI (no-op outside a Gradio request, e.g. in unit tests)."""
    try:
        import gradio as gr

        gr.Warning(message)
    except Exception:  # pragma: no cover
        log.warning(message)


def info(message: str) -> None:
    try:
        import gradio as gr

        gr.Info(message)
    except Exception:  # pragma: no cover
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


def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
    """``spaces.GPU`` on Hugging Face ZeroGPU Spaces when the package is importable, else a no-op."""
    try:
        import spaces  # type: ignore

        return spaces.GPU(duration=duration)
    except Exception:  # ImportError, or not on a Space
        return lambda fn: fn


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
    """One line on where heavy work runs."""
    warm_imports()
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        return f"GPU: **{name}** ({mem:.0f} GiB) · default dtype bfloat16/float16"
    return f"CPU only ({os.cpu_count()} cores) · default dtype float32 · fine for the demo models"
