"""server/memory.py: glibc's mmap and trim thresholds are fixed."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from server.memory import tune_malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

#: Allocate and free a 1 MiB buffer 200 times (a download's frames, in small);
#: print the page faults it took.
_FAULTS = """
import ctypes, resource, sys
from server.memory import M_MMAP_THRESHOLD, MMAP_THRESHOLD, tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
else:  # the threshold alone, as the server had it before
    assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    frame = b"x" * (1 << 20)
    del frame
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@glibc_only
def test_glibc_accepts_the_fixed_thresholds() -> None:
    assert tune_malloc() is True


@glibc_only
def test_freed_frames_are_reused_not_faulted_in_again() -> None:
    # 256 pages a MiB: without the trim threshold each buffer is faulted in anew.
    assert _faults("threshold-only") > 100 * 256
    assert _faults("tuned") < 10 * 256
