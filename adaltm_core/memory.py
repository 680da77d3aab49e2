"""Process-wide memory behaviour for the commands that stream whole checkpoints."""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
THRESHOLD = 1 << 20


def return_freed_memory() -> None:
    """Make glibc serve every allocation above 1 MiB with its own mmap, returned to the system when freed.

    glibc's default threshold grows to the size of the largest block freed (up to 32 MiB); after that, tensors of
    a few MiB come from the heap, and one long-lived tensor above the freed ones pins all of them: streaming a
    checkpoint tensor by tensor then held up to 2× its size (measured on a 32 M-parameter WavLM). A fixed
    threshold disables that growth. No effect off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass
