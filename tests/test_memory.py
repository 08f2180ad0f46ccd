"""server/memory.py: glibc's mmap threshold is fixed, so large freed buffers go back."""

from __future__ import annotations

import platform

import pytest

from server.memory import fix_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_fixed_mmap_threshold() -> None:
    assert fix_mmap_threshold() is True
