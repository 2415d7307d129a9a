"""How many fine-tuned models one merge or analysis takes: the one definition (CLI, app, library).

Torch-free and import-free on purpose: the UI and the method registry read it to build widgets.
"""

from __future__ import annotations

from acm.errors import InputError

MAX_FINE_TUNED = 3          # fine-tuned models per merge / analysis


def check_num_fine_tuned(n: int) -> int:
    """1 … MAX_FINE_TUNED fine-tuned models."""
    if n < 1:
        raise InputError("give at least one fine-tuned model")
    if n > MAX_FINE_TUNED:
        raise InputError(f"at most {MAX_FINE_TUNED} fine-tuned models are supported, got {n}")
    return n
