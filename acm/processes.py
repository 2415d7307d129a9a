"""Whether a process that left a temp folder or lock behind is still running.

Torch-free on purpose: the shared cache (``acm.cache``) and the atomic output folders
(``acm.checkpoints.shards``) both clean up after dead writers, and the cache must import without torch.
"""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists on this host (a process owned by someone else counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
