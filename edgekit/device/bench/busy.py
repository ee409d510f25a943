"""A competing load: processes spinning on the CPU while a benchmark runs.

A device is rarely idle (a robot's camera or planning node shares its cores), and onnxruntime's
worker threads spin-wait by default: a benchmark on a quiet machine overstates what a device
will see. `edgekit bench --background-load N` and benchmarks/ measure under this load too.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_cpus(n: int) -> Iterator[None]:
    """`n` processes (0: none) spinning on the CPU for as long as the block runs, stopped on exit
    whatever happens in it."""
    procs = [multiprocessing.get_context("fork").Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(0.2 if n else 0)  # let the scheduler spread them before the first timing
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
