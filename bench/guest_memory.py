"""Memory a VM's host backs for good, for benchmarks that allocate gigabytes.

A virtio balloon with free page reporting hands every free 2 MiB block back to the host;
the next first touch of its pages then waits for the host to back them again. Measured on
the VM godwit is built on: 149 MB/s to touch 12 GiB of such memory, 536 MB/s the next
time, 2.7 GB/s for memory touched just before. Every allocation (a restore's memory, the
page cache an image lands in) pays that at random, a real host never does, and the
benchmark's figures then depend on which pages each method happens to get.

`host_backed_memory()` stops the reporting for the run (its order above the largest) and
touches the free memory once, so that every method finds backed pages; on exit the order
is put back. Without free page reporting it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import time
from collections.abc import Iterator
from pathlib import Path

from godwit.procfs import mem_available

REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
NEVER = 11  # above MAX_PAGE_ORDER (10): no free block is large enough to be reported
SPARE = 2 << 30  # bytes left untouched for everything else
CHUNK = 1 << 30


def touch_free_memory() -> tuple[int, float]:
    """Touch (then free) all available memory but SPARE, a chunk at a time; returns bytes
    touched and seconds taken."""
    started, touched, chunks = time.monotonic(), 0, []
    try:
        while mem_available() - CHUNK > SPARE:
            chunk = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(chunk)), 1, CHUNK)
            chunks.append(chunk)
            touched += CHUNK
    finally:
        for chunk in chunks:
            chunk.close()
    return touched, time.monotonic() - started


@contextlib.contextmanager
def host_backed_memory() -> Iterator[dict]:
    """For the duration: no free page reporting, free memory touched once. Yields what
    was done, for the results' machine facts."""
    if not REPORTING_ORDER.exists():
        yield {"free_page_reporting": False}
        return
    before = REPORTING_ORDER.read_text().strip()
    REPORTING_ORDER.write_text(str(NEVER))
    try:
        touched, seconds = touch_free_memory()
        yield {"free_page_reporting": True, "reporting_order_was": int(before),
               "reporting_stopped_for_run": True, "touched_gib": round(touched / (1 << 30), 1),
               "touch_seconds": round(seconds, 1)}
    finally:
        REPORTING_ORDER.write_text(before)
