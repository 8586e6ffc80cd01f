"""The sweeps over the servers under test, each point on texts no earlier point sent, so that
nothing is served from a cache unless the workload means it to be (Zipf)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from rich.console import Console

from benchmarks.corpus import corpus
from benchmarks.latency import load_point, requests_at, saturated
from benchmarks.load import Outcome, ServerError, run_batches, run_singles, run_zipf
from benchmarks.report.plan import Plan
from benchmarks.report.schema import ConcurrencyPoint, LoadPoint, Quantiles, ZipfPoint
from benchmarks.report.systems import Target

console = Console(stderr=True, width=120)  # progress lines stay whole in a log file
BATCH = 32  # texts per request of the batch workload
WARM_UP_TEXTS = 8
# A batch request may wait behind every other client's: at 128 clients of 32 texts each, a
# slow server takes minutes to answer the last one, which is a result, not a failure.
REQUEST_TIMEOUT = 1800.0


class FreshTexts:
    """Texts never handed out before in this run: the corpus in its order, then the corpus
    again behind a numbered prefix (a new text to every cache, a few tokens longer)."""

    def __init__(self, texts: Sequence[str] | None = None) -> None:
        self._texts = texts or corpus()
        self._taken = 0

    def take(self, count: int) -> list[str]:
        taken = []
        for number in range(self._taken, self._taken + count):
            lap, index = divmod(number, len(self._texts))
            text = self._texts[index]
            taken.append(f"({lap}) {text}" if lap else text)
        self._taken += count
        return taken


def quantiles(outcome: Outcome) -> Quantiles:
    return Quantiles(
        p50_ms=outcome.latency_ms(0.5),
        p95_ms=outcome.latency_ms(0.95),
        p99_ms=outcome.latency_ms(0.99),
    )


def warm_up(targets: Sequence[Target], texts: FreshTexts) -> None:
    """A few requests to each server before anything is timed: a model's first calls (and a
    connection pool's first connections) are not its steady state."""
    chunk = texts.take(WARM_UP_TEXTS)
    for target in targets:
        asyncio.run(run_singles(target.url, chunk, clients=2))
        asyncio.run(run_batches(target.url, texts.take(BATCH), clients=1))


def concurrency_sweep(
    targets: Sequence[Target], texts: FreshTexts, plan: Plan
) -> list[ConcurrencyPoint]:
    """Closed loop: ``clients`` clients, each sending its next request when its last is
    answered. Every server gets the same texts at a point, back to back."""
    points: list[ConcurrencyPoint] = []
    failed: set[str] = set()  # a server that failed a point leaves the sweep
    for workload, counts in (("singles", plan.single_clients), ("batches", plan.batch_clients)):
        for clients in counts:
            if workload == "singles":
                chunk = texts.take(max(plan.min_single_requests, 2 * clients))
            else:
                chunk = texts.take(BATCH * max(plan.min_batch_requests, clients))
            for target in targets:
                if target.name in failed:
                    continue
                run = run_singles if workload == "singles" else run_batches
                try:
                    outcome = asyncio.run(run(target.url, chunk, clients, REQUEST_TIMEOUT))
                except ServerError as error:
                    # A result, not the end of the run: the page shows it, the log says why.
                    console.print(
                        f"  [red]{target.name} failed[/red] at {clients} clients: {error}"
                    )
                    failed.add(target.name)
                    points.append(_failed_point(target, workload, clients, str(error)))
                    continue
                points.append(_concurrency_point(target, workload, clients, outcome))
    return points


def _failed_point(target: Target, workload: str, clients: int, error: str) -> ConcurrencyPoint:
    nan = math.nan
    return ConcurrencyPoint(
        system=target.name,
        workload="singles" if workload == "singles" else "batches",
        clients=clients,
        requests=0,
        texts_per_s=nan,
        requests_per_s=nan,
        p50_ms=nan,
        p95_ms=nan,
        p99_ms=nan,
        failed=error[:300],
    )


def _concurrency_point(
    target: Target, workload: str, clients: int, outcome: Outcome
) -> ConcurrencyPoint:
    console.print(
        f"  {target.name:16} {workload:8} {clients:4} clients "
        f"{outcome.texts_per_second:8,.1f} texts/s  p99 {outcome.latency_ms(0.99):8,.0f} ms"
    )
    latency = quantiles(outcome)
    return ConcurrencyPoint(
        system=target.name,
        workload="singles" if workload == "singles" else "batches",
        clients=clients,
        requests=outcome.requests,
        texts_per_s=outcome.texts_per_second,
        requests_per_s=outcome.requests_per_second,
        p50_ms=latency["p50_ms"],
        p95_ms=latency["p95_ms"],
        p99_ms=latency["p99_ms"],
    )


def offered_load_sweep(targets: Sequence[Target], texts: FreshTexts, plan: Plan) -> list[LoadPoint]:
    """Open loop at each offered rate, evenly spaced arrivals, every server in turn on the
    same texts; a server leaves the sweep after the first rate that saturates it."""
    points: list[LoadPoint] = []
    active = list(targets)
    for rate in plan.offered_rates:
        if not active:
            break
        chunk = texts.take(requests_at(rate, plan.seconds_per_rate))
        for target in list(active):
            point = load_point(target.url, chunk, rate, poisson=False)
            p50, p95, p99 = point.latency_ms
            console.print(
                f"  {target.name:16} offered {rate:6g}/s answered {point.achieved:7.1f}/s  "
                f"p99 {p99:8,.0f} ms  errors {point.errors}"
            )
            points.append(
                LoadPoint(
                    system=target.name,
                    offered=rate,
                    achieved=point.achieved,
                    errors=point.errors,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                )
            )
            if saturated(point):
                active.remove(target)
    return points


def zipf_sweep(targets: Sequence[Target], texts: FreshTexts, plan: Plan) -> list[ZipfPoint]:
    """Single-text requests with Zipf(s) popularity over texts no server has seen, for each
    skew; only the servers with a cache."""
    points: list[ZipfPoint] = []
    for s in plan.zipf_skews:
        distinct = texts.take(plan.zipf_distinct)
        for target in targets:
            if target.model_work is None:
                continue
            work = run_zipf(
                target.url,
                distinct,
                plan.zipf_requests,
                target.model_work,
                clients=plan.zipf_clients,
                s=s,
            )
            outcome = asyncio.run(work)
            hit, ideal = outcome.hit_rate or 0.0, outcome.ideal_hit_rate or 0.0
            console.print(
                f"  {target.name:16} Zipf s={s:<4} hit rate {hit:6.1%} (ideal {ideal:6.1%}) "
                f"{outcome.texts_per_second:8,.1f} texts/s"
            )
            points.append(
                ZipfPoint(
                    system=target.name,
                    s=s,
                    hit_rate=hit,
                    ideal_hit_rate=ideal,
                    texts_per_s=outcome.texts_per_second,
                    **quantiles(outcome),
                )
            )
    return points
