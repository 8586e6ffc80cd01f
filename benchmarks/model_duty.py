"""Where singles lose against batches: the model's share of the wall clock under each load.

    python -m benchmarks.model_duty          # make bench-duty

One real ``embedpipe serve`` (embedded default, every core for the model, as make bench runs
it) is driven by make bench's two throughput loads in turn, 64 clients of one unique text and
2 clients of 32 unique texts, in alternating rounds. Its /metrics is read before and after
each round: model calls, texts per call, padded tokens per call and seconds in model calls.
The server's and this load generator's CPU seconds come from /proc. Then raw ``encode`` runs
calls of each round's size on the same texts, in this process, with the server idle.

A workload's texts/s is its model duty (the share of the wall clock inside model calls)
over its model milliseconds per text. So the gap between singles and batches splits into:
- duty: the model idles while requests are parsed, counted, looked up and answered;
- size: a call of fewer texts costs more per text natively (raw, alone, same sizes);
- company: the same call costs more inside the server than alone, as the event loop, the
  cache's thread and the load generator share the cores with the model's threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.corpus import load_corpus
from benchmarks.load import Outcome, run_batches, run_singles, use_uvloop
from benchmarks.throughput import RawModel, cpu_seconds, machine
from tests.server_process import ServerProcess, metric_value, scrape_metrics

MODEL = "all-MiniLM-L6-v2"
WORKLOADS: dict[str, Callable[[str, Sequence[str]], Coroutine[Any, Any, Outcome]]] = {
    "singles": run_singles,
    "batches": run_batches,
}


@dataclass(frozen=True)
class ModelCounters:
    """The server's model-call counters at one moment (/metrics)."""

    calls: float
    texts: float
    padded_tokens: float
    seconds: float

    @classmethod
    def read(cls, url: str) -> ModelCounters:
        text = scrape_metrics(url)

        def value(name: str) -> float:
            return metric_value(text, name, model=MODEL)

        return cls(
            calls=value("embedpipe_batch_size_count"),
            texts=value("embedpipe_batch_size_sum"),
            padded_tokens=value("embedpipe_batch_tokens_sum"),
            seconds=value("embedpipe_inference_duration_seconds_sum"),
        )

    def __sub__(self, earlier: ModelCounters) -> ModelCounters:
        return ModelCounters(
            self.calls - earlier.calls,
            self.texts - earlier.texts,
            self.padded_tokens - earlier.padded_tokens,
            self.seconds - earlier.seconds,
        )


@dataclass(frozen=True)
class Round:
    """One workload's round: what the clients saw, what the model did, who used the CPU."""

    workload: str
    wall: float
    texts: int
    model: ModelCounters
    server_cpu: float
    generator_cpu: float
    raw_ms_per_text: float = 0.0  # raw encode, alone, in calls of this round's mean size

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.wall

    @property
    def duty(self) -> float:
        return self.model.seconds / self.wall

    @property
    def texts_per_call(self) -> float:
        return self.model.texts / max(self.model.calls, 1)

    @property
    def model_ms_per_text(self) -> float:
        return 1000 * self.model.seconds / max(self.model.texts, 1)


def generator_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_round(server: ServerProcess, workload: str, texts: Sequence[str]) -> Round:
    assert server.process is not None
    pid = server.process.pid
    before, server_before, generator_before = (
        ModelCounters.read(server.url),
        cpu_seconds(pid),
        generator_cpu_seconds(),
    )
    outcome = asyncio.run(WORKLOADS[workload](server.url, texts))
    return Round(
        workload=workload,
        wall=outcome.seconds,
        texts=outcome.texts,
        model=ModelCounters.read(server.url) - before,
        server_cpu=cpu_seconds(pid) - server_before,
        generator_cpu=generator_cpu_seconds() - generator_before,
    )


def raw_ms_per_text(model: RawModel, texts: Sequence[str], size: int) -> float:
    """Raw ``encode`` in calls of ``size`` texts of similar length (the batcher groups by
    length): each call padded to its longest text, as the server's calls are."""
    counts = model.token_counts(list(texts))
    ordered = [text for _, text in sorted(zip(counts, texts, strict=True))]
    calls = [ordered[start : start + size] for start in range(0, len(ordered), size)]
    started = time.perf_counter()
    for call in calls:
        model.model.encode(call, batch_size=size, normalize_embeddings=True)
    return 1000 * (time.perf_counter() - started) / len(texts)


def median_of(rounds: Sequence[Round], value: Callable[[Round], float]) -> float:
    return statistics.median(value(r) for r in rounds)


def report(rounds: Sequence[Round], raw32: float, started: str) -> str:
    columns: list[tuple[str, Callable[[Round], float], str]] = [
        ("texts/s", lambda r: r.texts_per_second, "{:.1f}"),
        ("model duty", lambda r: r.duty, "{:.0%}"),
        ("texts per call", lambda r: r.texts_per_call, "{:.1f}"),
        (
            "padded tokens per call",
            lambda r: r.model.padded_tokens / max(r.model.calls, 1),
            "{:.0f}",
        ),
        ("model ms per text, in the server", lambda r: r.model_ms_per_text, "{:.2f}"),
        ("raw ms per text, calls of that size, alone", lambda r: r.raw_ms_per_text, "{:.2f}"),
        ("server CPU s per s", lambda r: r.server_cpu / r.wall, "{:.2f}"),
        ("load generator CPU s per s", lambda r: r.generator_cpu / r.wall, "{:.2f}"),
    ]
    workloads = list(WORKLOADS)
    lines = [
        "## Model duty: singles against batches",
        "",
        f"Machine: {started} at the start, {machine().rpartition('load average ')[2]} at the "
        f"end. Medians of {len(rounds) // len(workloads)} alternating rounds per workload. "
        f"Raw encode in calls of 32 (make bench's raw row): {raw32:.2f} ms per text.",
        "",
        "| | " + " | ".join(workloads) + " |",
        "| --- | " + " | ".join("---:" for _ in workloads) + " |",
    ]
    by_workload = {w: [r for r in rounds if r.workload == w] for w in workloads}
    for title, value, shape in columns:
        cells = [shape.format(median_of(by_workload[w], value)) for w in workloads]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    singles, batches = by_workload["singles"], by_workload["batches"]
    share = median_of(singles, lambda r: r.texts_per_second) / median_of(
        batches, lambda r: r.texts_per_second
    )
    duty = median_of(singles, lambda r: r.duty) / median_of(batches, lambda r: r.duty)
    per_text = median_of(batches, lambda r: r.model_ms_per_text) / median_of(
        singles, lambda r: r.model_ms_per_text
    )
    size = median_of(batches, lambda r: r.raw_ms_per_text) / median_of(
        singles, lambda r: r.raw_ms_per_text
    )
    lines += [
        "",
        f"Singles run at {share:.2f}x the batches' texts/s = duty {duty:.2f}x "
        f"x model cost per text {per_text:.2f}x; of the latter, the calls' sizes alone "
        f"(raw) account for {size:.2f}x and the company in the server for "
        f"{per_text / size:.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512, help="unique texts per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_uvloop()
    started = machine()
    workloads = list(WORKLOADS)
    slices = {
        (n, w): load_corpus(args.texts, args.texts * (n * len(workloads) + i))
        for n in range(args.rounds)
        for i, w in enumerate(workloads)
    }
    model = RawModel()
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-duty-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(
            {
                "EMBEDPIPE_DATA_DIR": str(workdir / "data"),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_MODEL_THREADS": "0",
            },
            workdir / "embedpipe.log",
        ).start()
        try:
            for n in range(args.rounds):
                for workload in workloads:
                    done = run_round(server, workload, slices[n, workload])
                    print(
                        f"  {workload:8} {done.texts_per_second:6.1f} texts/s, duty "
                        f"{done.duty:.0%}, {done.texts_per_call:.1f} texts per call, "
                        f"{done.model_ms_per_text:.2f} model ms per text",
                        flush=True,
                    )
                    rounds.append(done)
        finally:
            server.stop()
    # Raw, with the server gone: calls of each round's own mean size, on its own texts.
    rounds = [
        replace(
            r,
            raw_ms_per_text=raw_ms_per_text(
                model, slices[i // len(workloads), r.workload], max(1, round(r.texts_per_call))
            ),
        )
        for i, r in enumerate(rounds)
    ]
    raw32 = statistics.median(
        raw_ms_per_text(model, slices[n, "batches"], 32) for n in range(args.rounds)
    )
    print(report(rounds, raw32, started))


if __name__ == "__main__":
    main()
