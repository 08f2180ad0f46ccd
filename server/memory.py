"""Fix glibc's malloc thresholds for a process that moves 1-4 MiB buffers.

glibc serves allocations above ``M_MMAP_THRESHOLD`` with their own ``mmap``,
unmapped on free. But each time such a block is freed it raises that
threshold (up to 32 MiB), after which the 4 MiB part buffers of an S3 upload
come from the heap arenas of whichever thread allocated them, and freed
memory stays in the process. Measured on an S3 upload (bench/upload_memory.py):
RSS growth 58-62 MiB with the dynamic threshold, 23-27 MiB with it fixed,
against a bound of 2 x window + 2 x max_partition = 48 MiB. A fixed threshold
of 128 KiB cost a third of the download throughput (every 1 MiB frame
mmapped); 4 MiB keeps chunk-sized buffers on the heap. Setting the threshold
explicitly is what stops the adjustment.

Fixing it also stops glibc's matching adjustment of ``M_TRIM_THRESHOLD`` (kept
at twice the mmap threshold), which then stays at 128 KiB: every freed 1 MiB
frame at the top of a heap is handed back to the kernel and faulted in again
by the next one. That cost the WebSocket download half its speed (server in
the kernel 0.9-1.3 s/GiB against 0.4 with the trim threshold at 8 MiB; 640-830
MiB/s against 1,240-1,350 on the same machine), so it is set to what glibc
would have chosen: twice the mmap threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def tune_malloc() -> bool:
    """True when glibc took both settings (False elsewhere: musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused")
    return done
