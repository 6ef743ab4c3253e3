"""Compute the next tensors of a plan while the writer writes the current one.

The writer calls each computed tensor's loader in plan order; a cast tensor costs CPU (numpy)
and writing costs I/O, and both release the GIL, so one worker thread that computes up to
`depth` tensors ahead overlaps the two. Tensors the writer copies file to file (raw spans) are
left alone. Memory: at most `depth` + 1 computed tensors at a time. `workers` > 1 computes that
many tensors at once (callers whose loaders are single-threaded, e.g. `lora apply` with BLAS
limited to one thread, see sdtk.blas).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Sequence

from sdtk.tensors import LazyTensor

SPAN_COPY_MIN_BYTES = 1 << 20  # formats.safetensors.write_safetensors copies spans of >= 1 MiB


def _copied_by_writer(t: LazyTensor) -> bool:
    return t.span is not None and t.span.length == t.nbytes and t.nbytes >= SPAN_COPY_MIN_BYTES


class Prefetcher:
    """`plan = Prefetcher(plan).plan`; call `close()` when the write is over (or failed)."""

    def __init__(self, plan: Sequence[LazyTensor], depth: int = 2, workers: int = 1):
        self.depth = max(depth, workers)
        self.computed: List[LazyTensor] = [t for t in plan if not _copied_by_writer(t)]
        self.index: Dict[int, int] = {id(t): i for i, t in enumerate(self.computed)}
        self.futures: Dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdtk-prefetch")
        self.lock = threading.Lock()
        self.plan = [t if _copied_by_writer(t) else self._wrapped(t) for t in plan]

    def _wrapped(self, t: LazyTensor) -> LazyTensor:
        i = self.index[id(t)]

        def load():
            with self.lock:
                for j in range(i, min(i + 1 + self.depth, len(self.computed))):
                    if j not in self.futures:
                        self.futures[j] = self.pool.submit(self.computed[j].read)
                future = self.futures.pop(i)
            return future.result()

        return LazyTensor(t.name, t.dtype, tuple(t.shape), load, t.span)

    def close(self) -> None:
        with self.lock:
            for f in self.futures.values():
                f.cancel()
            self.futures.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
