"""Triton kernels; each has a pure-torch reference in engine/attention.py."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether Triton can compile for the GPU here (or interpret, with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
