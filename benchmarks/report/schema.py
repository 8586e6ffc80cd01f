"""The results JSON of one run (benchmarks/results/report.json by default, docs/benchmarks/
report.json for the published run): everything the page and the plots are drawn from, so
either can be rendered again without measuring again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

Workload = Literal["singles", "batches"]


class Machine(TypedDict):
    cpu: str
    instructions: str  # e.g. "AVX2, no VNNI" (environment.vector_instructions)
    cores: int  # usable by this process
    memory_gib: float
    kernel: str
    load_start: list[float]  # load averages (1, 5, 15 min)
    load_end: list[float]
    started: str  # ISO 8601, UTC
    finished: str


class Quantiles(TypedDict):
    p50_ms: float
    p95_ms: float
    p99_ms: float


class ConcurrencyPoint(Quantiles):
    system: str
    workload: Workload
    clients: int
    requests: int
    texts_per_s: float
    requests_per_s: float
    failed: NotRequired[str]  # the server's bad answer, when it gave one (numbers are NaN)


class LoadPoint(Quantiles):
    system: str
    offered: float  # requests/s sent
    achieved: float  # good answers/s
    errors: int


class ZipfPoint(Quantiles):
    system: str
    s: float
    hit_rate: float  # texts the model did not compute / texts served
    ideal_hit_rate: float  # 1 - distinct / total of the stream
    texts_per_s: float


class BackendResult(TypedDict):
    backend: str
    texts_per_s: float  # every round
    best_texts_per_s: float  # each batch's fastest round
    cos_mean: float  # to torch fp32, per text
    cos_min: float
    top10: float  # share of the 10 nearest neighbours shared with torch fp32


class StartupRun(TypedDict):
    backend: str
    ready_s: float  # process start to /ready
    cpu_s: float  # CPU seconds used to get there
    rss_ready_mib: float
    peak_start_mib: float
    rss_after_mib: float
    first_ms: float  # the first request after /ready
    steady_ms: float  # median of the following ones


class Peer(TypedDict):
    name: str
    measured: bool
    note: str  # what it is, or why it was not measured


class Raw(TypedDict):
    batches_texts_per_s: float  # encode, batches of 32 in arrival order
    singles_texts_per_s: float  # encode([text]), one at a time


class Report(TypedDict):
    plan: dict[str, Any]
    machine: Machine
    versions: dict[str, str]
    corpus: str
    peers: list[Peer]
    raw: Raw
    concurrency: list[ConcurrencyPoint]
    offered_load: list[LoadPoint]
    zipf: list[ZipfPoint]
    backends: list[BackendResult]
    startup: list[StartupRun]
    rss_mib: dict[str, float]  # each server under test after the run
    seconds: dict[str, float]  # how long each section took


def save(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")


def load(path: Path) -> Report:
    return cast(Report, json.loads(path.read_text()))
