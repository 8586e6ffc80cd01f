"""Issue 18's measured goals, each judged from one run's results: the verdicts the page states
beside the numbers they come from. A goal whose numbers the run lacks says so, never "met"."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from benchmarks.report.schema import Report, StartupRun
from benchmarks.report.systems import EMBEDPIPE, NAIVE

SINGLES_CLIENTS = 64
MIN_FP32_COSINE = 0.9999


@dataclass(frozen=True, slots=True)
class Verdict:
    goal: str
    measured: str
    met: bool | None  # None: the run has no numbers for it


def verdicts(report: Report) -> list[Verdict]:
    return [*_throughput(report), *_backends(report), *_startup(report)]


def _throughput(report: Report) -> Iterator[Verdict]:
    rate = {
        point["system"]: point["texts_per_s"]
        for point in report["concurrency"]
        if point["workload"] == "singles" and point["clients"] == SINGLES_CLIENTS
    }
    ours, naive = rate.get(EMBEDPIPE, math.nan), rate.get(NAIVE, math.nan)
    raw = report["raw"]["batches_texts_per_s"]
    yield _at_least(
        f"{SINGLES_CLIENTS} clients x 1 text >= 1.0x raw `encode` (batches of 32)",
        _ratio(ours, raw),
        1.0,
        f"{ours:,.1f} / {raw:,.1f} texts/s",
    )
    yield _at_least(
        f"{SINGLES_CLIENTS} clients x 1 text >= 1.5x the naive design",
        _ratio(ours, naive),
        1.5,
        f"{ours:,.1f} / {naive:,.1f} texts/s",
    )


def _backends(report: Report) -> Iterator[Verdict]:
    rows = {row["backend"]: row for row in report["backends"]}
    torch = rows.get("torch")
    fp32, int8 = rows.get("onnx fp32"), rows.get("onnx int8")
    if torch is None or fp32 is None or int8 is None:
        yield Verdict("ONNX fp32 and int8 against torch", "not in this run", None)
        return
    fp32_ratio = _ratio(fp32["texts_per_s"], torch["texts_per_s"])
    yield Verdict(
        "ONNX fp32 >= 1.3x torch at cosine >= 0.9999 (moonshot 1.5x)",
        f"{fp32_ratio:.2f}x, cosine min {fp32['cos_min']:.5f}",
        fp32_ratio >= 1.3 and fp32["cos_min"] >= MIN_FP32_COSINE,
    )
    int8_ratio = _ratio(int8["texts_per_s"], torch["texts_per_s"])
    yield Verdict(
        "int8 >= 1.6x torch at top-10 >= 0.97 and cosine min >= 0.995",
        f"{int8_ratio:.2f}x, top-10 {int8['top10']:.3f}, cosine min {int8['cos_min']:.4f}",
        int8_ratio >= 1.6 and int8["top10"] >= 0.97 and int8["cos_min"] >= 0.995,
    )


def _startup(report: Report) -> Iterator[Verdict]:
    backends = dict.fromkeys(run["backend"] for run in report["startup"])
    for backend in backends:
        runs = [run for run in report["startup"] if run["backend"] == backend]
        median = partial(_median, runs)
        memory_goal = 400.0 if backend == "torch" else 250.0
        yield _at_most(
            f"{backend}: resident memory with the model loaded <= {memory_goal:g} MiB",
            median("rss_ready_mib"),
            memory_goal,
            "{:,.0f} MiB",
        )
        if backend == "torch":
            continue
        yield _at_most(f"{backend}: /ready <= 3 s after start", median("ready_s"), 3.0, "{:.2f} s")
        first = statistics.median(_ratio(run["first_ms"], run["steady_ms"]) for run in runs)
        yield _at_most(
            f"{backend}: first request after /ready <= 2x steady state", first, 2.0, "{:.2f}x"
        )


def _median(runs: Sequence[StartupRun], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)  # type: ignore[literal-required]


def _ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom > 0 else math.nan


def _at_least(goal: str, ratio: float, bound: float, numbers: str) -> Verdict:
    return _judged(goal, ratio, f"{ratio:.2f}x ({numbers})", lambda value: value >= bound)


def _at_most(goal: str, value: float, bound: float, shown: str) -> Verdict:
    return _judged(goal, value, shown.format(value), lambda measured: measured <= bound)


def _judged(goal: str, value: float, shown: str, holds: Callable[[float], bool]) -> Verdict:
    if math.isnan(value):
        return Verdict(goal, "not in this run", None)
    return Verdict(goal, shown, holds(value))


def table(report: Report) -> list[str]:
    """The Markdown table of every verdict."""
    lines = ["| goal (issue 18) | measured | verdict |", "| --- | ---: | --- |"]
    for verdict in verdicts(report):
        state = {True: "met", False: "**not met**", None: "-"}[verdict.met]
        lines.append(f"| {verdict.goal} | {verdict.measured} | {state} |")
    return lines
