"""What one run measures: the full plan, or a quick one that checks the pipeline end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Plan:
    name: str
    single_clients: tuple[int, ...]  # concurrency points, one text per request
    batch_clients: tuple[int, ...]  # concurrency points, 32 texts per request
    min_single_requests: int  # per point, at least; and 2 per client
    min_batch_requests: int  # per point, at least; and 1 per client
    offered_rates: tuple[float, ...]  # requests/s, up to one past saturation
    seconds_per_rate: float
    zipf_skews: tuple[float, ...]
    zipf_distinct: int
    zipf_requests: int
    zipf_clients: int
    raw_texts: int  # texts raw ``encode`` is timed on, batches of 32 and one at a time
    backend_texts: int
    backend_rounds: int
    backend_queries: int  # texts whose 10 nearest neighbours count for fidelity
    startup_runs: int  # starts per backend
    startup_requests: int  # sequential requests after each start

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def up_to(self, clients: int) -> Plan:
        """This plan without its concurrency points above ``clients``."""
        return replace(
            self,
            single_clients=tuple(c for c in self.single_clients if c <= clients),
            batch_clients=tuple(c for c in self.batch_clients if c <= clients),
        )


FULL = Plan(
    name="full",
    single_clients=(1, 2, 4, 8, 16, 32, 64, 128),
    batch_clients=(1, 2, 4, 8, 16, 32, 64, 128),
    min_single_requests=64,
    min_batch_requests=4,
    # ~1.5x steps, so the knee is placed within a step of 50%.
    offered_rates=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
    seconds_per_rate=8.0,
    zipf_skews=(0.6, 0.8, 1.0, 1.1, 1.2, 1.4),
    zipf_distinct=1000,
    zipf_requests=2000,
    zipf_clients=64,
    raw_texts=256,
    backend_texts=512,
    backend_rounds=2,
    backend_queries=512,  # every text a query, as the int8 export's gate counts top-10
    startup_runs=2,
    startup_requests=40,
)

QUICK = Plan(
    name="quick",
    single_clients=(1, 8, 64),
    batch_clients=(1, 4),
    min_single_requests=8,
    min_batch_requests=2,
    offered_rates=(1, 8, 64, 256),
    seconds_per_rate=2.0,
    zipf_skews=(0.8, 1.2),
    zipf_distinct=100,
    zipf_requests=200,
    zipf_clients=16,
    raw_texts=32,
    backend_texts=64,
    backend_rounds=1,
    backend_queries=20,
    startup_runs=1,
    startup_requests=5,
)
