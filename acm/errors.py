"""User-facing errors.

Every failure a user can cause or fix is raised as an ``ACMError`` with a one-line message, so
the CLI can print it without a traceback and the UI can show it as a readable message.
"""

import re


class ACMError(Exception):
    """Base class: a failure explained in one line. CLI exit code 1 (runtime failure)."""

    exit_code = 1


class InputError(ACMError):
    """Bad usage or bad input (paths, models, files, parameter ranges). CLI exit code 2."""

    exit_code = 2


class CompatibilityError(InputError):
    """Models cannot be merged or compared (architecture, layer count, hidden size...)."""


class OfflineError(InputError):
    """A Hub resource was requested but the Hub cannot be reached (offline mode or no network)."""


class OutOfMemoryAdvice(ACMError):
    """Ran out of (GPU or CPU) memory; the message carries advice (smaller batch, fewer samples)."""


# Phrases torch / the allocators use for out-of-memory (CUDA, MPS, CPU allocator, Python).
_OOM_PHRASES = ("out of memory", "not enough memory", "cannot allocate memory", "defaultcpuallocator")

OOM_ADVICE = "use a smaller batch size, fewer calibration samples or fewer max tokens (or a machine with more memory)"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError, MemoryError and allocator RuntimeErrors on any device.

    Why one place: the analysis, the CLI's last line of defence and the app all turn these into
    advice instead of a crash, and the CPU allocator's wording differs from CUDA's.
    """
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom_cls is not None and isinstance(exc, oom_cls):
            return True
    except ImportError:  # pragma: no cover - torch is a requirement
        pass
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in _OOM_PHRASES)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages can span many lines)."""
    return (str(exc).strip().splitlines() or [""])[0]


# Hugging Face user access tokens ("hf_" + letters/digits) and the legacy "api_org_" tokens.
_TOKEN_RE = re.compile(r"\b(?:hf_|api_org_)[A-Za-z0-9]{8,}")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with Hub tokens (and any explicitly given secrets) replaced by ``***``.

    Why: error messages and logs may quote a request or an argument; a token must never reach the
    terminal, a log file, a UI toast or an exported file.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("***", text)
