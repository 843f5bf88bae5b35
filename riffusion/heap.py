"""Giving freed heap memory back to the operating system.

glibc keeps freed blocks under its mmap threshold in the process's heap (the
threshold grows with the blocks freed, up to 32 MB), so a worker's resident
memory stays at its highest point after a large clip is post-processed unless
the heap is trimmed. Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``); False when unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
