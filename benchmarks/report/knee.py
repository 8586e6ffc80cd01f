"""Where latency turns up under offered load, by a rule simple enough to state on the page."""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.report.schema import LoadPoint

P99_FACTOR = 3.0  # p99 may grow to this multiple of its value at the lowest rate
KEEP_UP = 0.9  # answers per second, at least this share of the requests sent per second

RULE = (
    f"the knee is the highest offered rate up to which, at every rate, the server answers at "
    f"least {KEEP_UP:.0%} of the requests sent per second, with no errors, and p99 stays "
    f"within {P99_FACTOR:g}x its value at the lowest rate"
)


def knee(points: Sequence[LoadPoint]) -> float | None:
    """The knee of one server's sweep (``RULE``); None when even the lowest rate fails it."""
    ordered = sorted(points, key=lambda point: point["offered"])
    if not ordered:
        return None
    limit = P99_FACTOR * ordered[0]["p99_ms"]
    found = None
    for point in ordered:
        keeps_up = point["achieved"] >= KEEP_UP * point["offered"] and not point["errors"]
        if not keeps_up or math.isnan(point["p99_ms"]) or point["p99_ms"] > limit:
            break
        found = point["offered"]
    return found
