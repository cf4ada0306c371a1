"""Letting go of what an engine started (rank processes and their group, a core process) when
its owner is closed, garbage-collected or left at interpreter exit, whichever comes first.

The exit hook must run before multiprocessing's own: that one joins the process's non-daemon
children (a tensor-parallel engine core is one: an engine left open would hang the exit) and
terminates the daemon ones (ranks killed without their group let go). Exit hooks run last
registered first, so ours is registered on the first engine's start, after multiprocessing
has registered its hook at import.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing.util  # noqa: F401  (its exit hook exists before ours: see above)
import threading
import weakref
from collections.abc import Callable

_open: dict[int, weakref.finalize] = {}  # owners not closed yet, oldest first
_keys = itertools.count()
_lock = threading.Lock()
_hooked = False


def close_with(owner: object, close: Callable[..., None], *args: object) -> weakref.finalize:
    """Run close(*args) once: when the returned finalizer is called, when `owner` is collected,
    or at interpreter exit. `close` and `args` must not refer to `owner` (it would never be
    collected)."""
    global _hooked
    key = next(_keys)

    def run() -> None:
        with _lock:
            _open.pop(key, None)
        close(*args)

    finalizer = weakref.finalize(owner, run)
    finalizer.atexit = False  # our hook runs it, before multiprocessing's
    with _lock:
        _open[key] = finalizer
        if not _hooked:
            atexit.register(_close_all)
            _hooked = True
    return finalizer


def _close_all() -> None:
    """Newest first, as the owners would have unwound."""
    with _lock:
        finalizers = list(reversed(_open.values()))
    for finalizer in finalizers:
        finalizer()
