"""User-facing errors.

Every failure a user can cause or fix is raised as an ``ACMError`` with a one-line message, so
the CLI can print it without a traceback and the UI can show it as a readable message.
"""


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
