"""The page's plots, drawn from the results JSON with matplotlib. Figures are made directly
(no pyplot: no global figure registry, no display); a PNG is written by the Agg canvas."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from benchmarks.report.knee import knee
from benchmarks.report.schema import LoadPoint, Report

# File name -> what it shows; the page names them in this order.
PLOTS = {
    "throughput-concurrency.png": "Throughput against concurrency, single texts and batches of 32",
    "latency-offered-load.png": "Latency against offered load (open loop), the knee marked",
    "zipf.png": "Hit rate and throughput against Zipf skew",
    "backends.png": "Backends: texts/s and fidelity to torch",
    "startup-memory.png": "Start-up and memory per backend",
}
COLOURS = {
    "embedpipe": "tab:blue",
    "naive": "tab:orange",
    "Infinity 0.0.78": "tab:green",
    "raw `encode`": "tab:gray",
}
DPI = 110


def _colour(system: str) -> str:
    return COLOURS.get(system, "tab:purple")


def _systems(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _log2_axis(ax: Axes) -> None:
    """A log-2 x axis labelled 1, 2, 4, ... rather than 2^0, 2^1, 2^2."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def throughput_concurrency(report: Report, path: Path) -> None:
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    raw = report["raw"]
    for ax, workload, raw_rate, raw_label in (
        (axes[0], "singles", raw["singles_texts_per_s"], "raw `encode([text])`, one at a time"),
        (axes[1], "batches", raw["batches_texts_per_s"], "raw `encode`, batches of 32"),
    ):
        points = [p for p in report["concurrency"] if p["workload"] == workload]
        for system in _systems([p["system"] for p in points]):
            mine = sorted((p for p in points if p["system"] == system), key=lambda p: p["clients"])
            xs, ys = [p["clients"] for p in mine], [p["texts_per_s"] for p in mine]
            ax.plot(xs, ys, marker="o", color=_colour(system), label=system)
        ax.axhline(raw_rate, color=_colour("raw `encode`"), linestyle="--", label=raw_label)
        _log2_axis(ax)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("texts/s")
        ax.set_ylim(bottom=0)
        title = "one text per request" if workload == "singles" else "32 texts per request"
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save(figure, path)


def latency_offered_load(report: Report, path: Path) -> None:
    points = report["offered_load"]
    systems = _systems([p["system"] for p in points]) or ["embedpipe"]
    figure = Figure(figsize=(4.2 * len(systems), 4))
    axes = figure.subplots(1, len(systems), squeeze=False, sharey=True)  # one scale to compare
    for ax, system in zip(axes[0], systems, strict=True):
        mine: list[LoadPoint] = sorted(
            (p for p in points if p["system"] == system), key=lambda p: p["offered"]
        )
        xs = [p["offered"] for p in mine]
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ys = [p[key] for p in mine]  # type: ignore[literal-required]
            ax.plot(xs, ys, linestyle=style, marker=".", color=_colour(system), label=key[:3])
        found = knee(mine)
        if found is not None:
            ax.axvline(found, color="black", alpha=0.5, label=f"knee {found:g}/s")
        _log2_axis(ax)
        ax.set_yscale("log")
        ax.set_xlabel("offered requests/s (open loop)")
        ax.set_ylabel("latency, ms")
        ax.set_title(system)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(figure, path)


def zipf(report: Report, path: Path) -> None:
    points = report["zipf"]
    figure = Figure(figsize=(11, 4))
    hits, rates = figure.subplots(1, 2)
    for system in _systems([p["system"] for p in points]):
        mine = sorted((p for p in points if p["system"] == system), key=lambda p: p["s"])
        xs = [p["s"] for p in mine]
        hits.plot(
            xs, [p["hit_rate"] for p in mine], marker="o", color=_colour(system), label=system
        )
        rates.plot(
            xs, [p["texts_per_s"] for p in mine], marker="o", color=_colour(system), label=system
        )
    ideal = {p["s"]: p["ideal_hit_rate"] for p in points}
    xs = sorted(ideal)
    hits.plot(
        xs, [ideal[x] for x in xs], linestyle="--", color="black", label="ideal for the stream"
    )
    hits.set_ylabel("hit rate (texts the model did not compute)")
    hits.set_ylim(0, 1)
    rates.set_ylabel("texts/s")
    rates.set_ylim(bottom=0)
    for ax in (hits, rates):
        ax.set_xlabel("Zipf skew s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save(figure, path)


def backends(report: Report, path: Path) -> None:
    rows = report["backends"]
    labels = [row["backend"] for row in rows]
    figure = Figure(figsize=(11, 4))
    speed, fidelity = figure.subplots(1, 2)
    positions = range(len(rows))
    speed.bar(
        [x - 0.2 for x in positions], [r["texts_per_s"] for r in rows], 0.4, label="all rounds"
    )
    speed.bar(
        [x + 0.2 for x in positions], [r["best_texts_per_s"] for r in rows], 0.4, label="best round"
    )
    speed.set_xticks(list(positions), labels)
    speed.set_ylabel("texts/s, in process")
    speed.legend(fontsize=8)
    for offset, key, label in (
        (-0.2, "cos_min", "cosine to torch, min"),
        (0.2, "top10", "top-10 neighbours shared"),
    ):
        values = [r[key] for r in rows]  # type: ignore[literal-required]
        bars = fidelity.bar([x + offset for x in positions], values, 0.4, label=label)
        fidelity.bar_label(bars, fmt="%.4f", fontsize=7)
    fidelity.set_xticks(list(positions), labels)
    low = min([r["cos_min"] for r in rows] + [r["top10"] for r in rows] + [1.0])
    fidelity.set_ylim(max(0.0, low - 0.05), 1.005)
    fidelity.set_ylabel("fidelity to torch fp32")
    fidelity.legend(fontsize=8, loc="lower left")
    for ax in (speed, fidelity):
        ax.grid(True, axis="y", alpha=0.3)
    _save(figure, path)


def startup_memory(report: Report, path: Path) -> None:
    runs = report["startup"]
    labels = _systems([run["backend"] for run in runs])

    def median(key: str) -> list[float]:
        return [
            statistics.median(run[key] for run in runs if run["backend"] == label)  # type: ignore[literal-required]
            for label in labels
        ]

    figure = Figure(figsize=(11, 4))
    ready, memory = figure.subplots(1, 2)
    positions = list(range(len(labels)))
    bars = ready.bar(positions, median("ready_s"), 0.5)
    ready.bar_label(bars, fmt="%.1f s", fontsize=8)
    ready.set_xticks(positions, labels)
    ready.set_ylabel("process start to /ready, s (median)")
    servers = list(report["rss_mib"])
    names = labels + [f"{name}\n(after the run)" for name in servers]
    width = 0.4
    ready_rss = median("rss_ready_mib")
    after = median("rss_after_mib") + [report["rss_mib"][name] for name in servers]
    memory.bar([x - width / 2 for x in positions], ready_rss, width, label="at /ready")
    bars = memory.bar(
        [x + width / 2 for x in range(len(names))], after, width, label="after requests"
    )
    memory.bar_label(bars, fmt="%.0f", fontsize=7)
    memory.set_xticks(list(range(len(names))), names, fontsize=7)
    memory.set_ylabel("resident memory, MiB")
    memory.legend(fontsize=8)
    for ax in (ready, memory):
        ax.grid(True, axis="y", alpha=0.3)
    _save(figure, path)


DRAW: dict[str, Callable[[Report, Path], None]] = {
    "throughput-concurrency.png": throughput_concurrency,
    "latency-offered-load.png": latency_offered_load,
    "zipf.png": zipf,
    "backends.png": backends,
    "startup-memory.png": startup_memory,
}


def draw_all(report: Report, directory: Path) -> list[Path]:
    """Every plot of ``PLOTS`` into ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTS:
        DRAW[name](report, directory / name)
        written.append(directory / name)
    return written
