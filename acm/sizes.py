"""The one way the project writes a number of bytes for people: binary units with IEC labels.

Why binary (KiB, MiB, GiB — powers of 1024): the sizes we print are read against memory — "will this
merged model fit in RAM / on this GPU", peak RSS, the calibration upload limit (``ACM_MAX_CALIBRATION_MB``
is in MiB) — and memory is counted in powers of two by the kernel, ``nvidia-smi`` and torch; the benchmark
tables already report MiB. Why the IEC labels: "GB" is ambiguous (the CLI used to print 1000-based and the
app 1024-based sizes, both labelled "GB", so the same merge showed two numbers); "GiB" is not.
Input sizes (``--shard-size 2GB``, ``ACM_CACHE_MAX_GB``) keep their own documented units — this module only
formats.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; ``15_231_000_000`` → ``"14.2 GiB"``; ``512`` → ``"512 B"``.

    Three significant figures are plenty for a size read by a person: one decimal below 100 of a
    unit, none from 100 up (so ``201 MiB``, not ``201.0 MiB``).
    """
    value = float(n)
    if abs(value) < 1023.5:                 # thresholds on the *rounded* figure: never "1024 MiB"
        return f"{value:.0f} B"
    step = 0
    value /= 1024
    while abs(value) >= 1023.5 and step < len(_UNITS) - 1:
        value /= 1024
        step += 1
    unit = _UNITS[step]
    return f"{value:.1f} {unit}" if abs(value) < 99.95 else f"{value:.0f} {unit}"


__all__ = ["format_bytes"]
