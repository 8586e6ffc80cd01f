"""How many intra-op threads a torch model call gets, and how they wait between parallel regions.

A forward pass of all-MiniLM-L6-v2 on one text runs ~160 OpenMP parallel regions. Between two
regions a worker thread either spins or sleeps:

* sleeping at once (``OMP_WAIT_POLICY=PASSIVE``, this module's old choice) costs a wake-up per
  region: 163 sleeps per single-text call, and a lone request paid ~4 ms for them (p50 17.6 vs
  13.6 ms on the same texts, idle cores);
* spinning without bound (OpenMP's default, ~3 ms per wait) is what raw ``encode`` does: fast
  on idle cores, and 0.45-0.6x as fast as one thread when the cores are shared;
* a bounded spin (``GOMP_SPINCOUNT=10000``, ~0.1 ms) bridges the gaps inside one forward pass
  (3 sleeps per call instead of 163) and then sleeps.

Spinning only pays while the cores are free. When other processes take them, a spinning thread
waits for a partner that is not running (measured under a load average of 10-13 on 2 cores:
10.6-11.7 texts/s spinning against 11.5-25.6 sleeping), and one thread alone gets one share
of the contended cores instead of two (6.6-12 texts/s in batches against 17-29). libgomp reads
its spin count once, but spins only ~100 times whenever its threads outnumber the cores. So
:class:`ThreadGovernor` watches the CPU time the process really gets during each call and,
while its calls get under 60% of its cores (a running share over the last calls, so that one
stalled call does not decide), runs the calls on one thread more than the cores (which then
sleep at once, as PASSIVE did); every 2 s one call on the cores alone tests whether they are
free again. Nobody has to tune it; ``EMBEDPIPE_MODEL_THREADS`` sets the cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("embedpipe.model")

# libgomp's own estimate is ~100,000 spins a millisecond: ~0.1 ms, a few gaps between parallel
# regions long, far below a request's time.
SPIN_COUNT = "10000"
# Share of its threads' wall time the process must get as CPU time for all threads to pay.
_CONTENDED_SHARE = 0.6
_FREE_SHARE = 0.8
# While on one thread, try all cores again this often (seconds).
_PROBE_EVERY = 2.0
# Calls shorter than this say little about contention (seconds).
_MIN_CALL = 0.002
# Weight of the latest call in the running share. One call alone must not decide: on idle
# cores a lone call now and then gets under 60% (a stall of its own: 0.45 and 0.55 measured
# among calls at 0.85-0.97), and each such flip cost the next 2 s of calls ~4 ms each.
_SHARE_WEIGHT = 0.3


def configure_openmp_wait() -> None:
    """Bounded spinning for torch's OpenMP threads, unless the operator chose a wait policy.

    Read when torch loads OpenMP: call before the first ``import torch``."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


class ThreadGovernor:
    """Chooses each model call's intra-op threads from the CPU the last calls got: the cores
    (spinning) while the process gets them, one more (sleeping) while it does not.

    ``set_threads`` is called on the model's own thread (OpenMP's team size is per thread)."""

    def __init__(self, cores: int, set_threads: Callable[[int], None]) -> None:
        self._cores = max(1, cores)
        self._set_threads = set_threads
        self._threads = self._cores
        # Contended: one thread more than the cores. libgomp then spins only ~100 times (it
        # does so whenever its threads outnumber the cores), which is sleeping at once.
        self._contended = self._cores + 1
        self._next_probe = 0.0
        # The running share of the calls on the cores alone: free until calls say otherwise.
        self._share = 1.0

    @property
    def threads(self) -> int:
        return self._threads

    def run(self, call: Callable[[], T]) -> T:
        """``call()`` with the chosen threads; its CPU share decides the next calls'."""
        threads = self._threads
        probing = threads != self._cores and time.monotonic() >= self._next_probe
        if probing:
            threads = self._cores
            self._set_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return call()
        finally:
            self.observe(threads, time.perf_counter() - wall, time.process_time() - cpu)

    def observe(self, threads: int, wall: float, cpu: float) -> None:
        """A call on ``threads`` threads took ``wall`` seconds and the process ``cpu`` seconds
        of CPU time (its event loop's included)."""
        if wall < _MIN_CALL or self._cores == 1:
            self._restore(threads)
            return
        share = cpu / (wall * min(threads, self._cores))
        if threads != self._cores:  # a sleeping team's call says nothing about the cores
            self._restore(threads)
            return
        if self._threads != self._cores:  # a probe: it alone decides, every 2 s
            if share >= _FREE_SHARE:
                log.info("model threads spin between regions: the cores are free again")
                self._threads, self._share = self._cores, share
            else:  # the cores still partly taken
                self._next_probe = time.monotonic() + _PROBE_EVERY
            self._restore(threads)
            return
        self._share += _SHARE_WEIGHT * (share - self._share)
        if self._share < _CONTENDED_SHARE:
            log.info(
                "model threads sleep between regions: the process got %.0f%% of %d cores",
                100 * self._share,
                threads,
            )
            self._threads = self._contended
            self._next_probe = time.monotonic() + _PROBE_EVERY
        self._restore(threads)

    def _restore(self, used: int) -> None:
        if used != self._threads:
            self._set_threads(self._threads)
