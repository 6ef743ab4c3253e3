"""Reusable float32 working buffers, one set per thread, for baking LoRAs into large weights.

A fresh large numpy array is fresh memory: every page faults and is zeroed by the kernel first
(perf, `lora apply` of SD1.5 with LoCon + LoHa: 18-25 % of all CPU time in `clear_page_erms`,
mostly under the LoHa products and the float32 working copy). A bake touches one weight at a time
per thread, so each thread keeps its largest buffers and reuses them. A buffer's contents are
valid until the same thread asks for the same slot again.
"""
from __future__ import annotations

import threading

import numpy as np

_THREAD = threading.local()


def scratch(n: int, slot: str = "work") -> np.ndarray:
    """n float32 values of this thread's buffer `slot` (uninitialised)."""
    bufs = getattr(_THREAD, "bufs", None)
    if bufs is None:
        bufs = _THREAD.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        bufs[slot] = None  # the smaller one is freed before the larger one is made
        buf = bufs[slot] = np.empty(n, dtype=np.float32)
    return buf[:n]
