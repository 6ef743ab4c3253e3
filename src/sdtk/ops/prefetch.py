"""Compute the next tensors of a plan while the writer writes the current one.

The writer calls each computed tensor's loader in plan order; a cast tensor costs CPU (numpy)
and writing costs I/O, and both release the GIL, so one worker thread that computes up to
`depth` tensors ahead overlaps the two. Tensors the writer copies file to file (raw spans) are
left alone, and so are raw reads the writer does itself. Memory: at most `depth` + 1 computed
tensors at a time. `workers` > 1 computes that many tensors at once (callers whose loaders are
single-threaded, e.g. `lora apply` with BLAS limited to one thread, see sdtk.blas).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Sequence

from sdtk.tensors import LazyTensor


def _computed(t: LazyTensor) -> bool:
    """A tensor whose loader does work (a cast, a LoRA bake): not the bytes of a file span as they
    are. Raw reads, even small ones the writer reads itself, take no look-ahead slot, so `depth`
    counts tensors that cost CPU (an SD1.5 bake interleaves every baked weight with raw biases
    and norms: counted, they left one or two bakes running ahead instead of `depth`)."""
    return t.span is None or t.span.length != t.nbytes


class Prefetcher:
    """`plan = Prefetcher(plan).plan`; call `close()` when the write is over (or failed)."""

    def __init__(self, plan: Sequence[LazyTensor], depth: int = 2, workers: int = 1):
        self.depth = max(depth, workers)
        self.computed: List[LazyTensor] = [t for t in plan if _computed(t)]
        self.index: Dict[int, int] = {id(t): i for i, t in enumerate(self.computed)}
        self.futures: Dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdtk-prefetch")
        self.lock = threading.Lock()
        self.plan = [self._wrapped(t) if _computed(t) else t for t in plan]

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
