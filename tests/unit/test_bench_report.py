"""``make bench-report``'s rendering, from a small hand-made results JSON: the page gets every
section between its markers (the hand-written parts untouched), every plot is a PNG, and the
knee follows the rule the page states. Nothing here measures or asserts speed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.report import goals, page, plots, schema
from benchmarks.report.knee import knee
from benchmarks.report.measure import FreshTexts
from benchmarks.report.plan import FULL, QUICK
from benchmarks.report.schema import ConcurrencyPoint, LoadPoint, Report, StartupRun, ZipfPoint

SYSTEMS = ("embedpipe", "naive", "Infinity 0.0.78")


def _load_point(system: str, offered: float, achieved: float, p99: float) -> LoadPoint:
    return LoadPoint(
        system=system,
        offered=offered,
        achieved=achieved,
        errors=0,
        p50_ms=p99 / 3,
        p95_ms=p99 / 1.5,
        p99_ms=p99,
    )


def _report() -> Report:
    concurrency = [
        ConcurrencyPoint(
            system=system,
            workload=workload,
            clients=clients,
            requests=2 * clients,
            texts_per_s=10.0 * (index + 1) + clients,
            requests_per_s=1.0 + clients,
            p50_ms=20.0 * clients,
            p95_ms=30.0 * clients,
            p99_ms=40.0 * clients,
        )
        for index, system in enumerate(SYSTEMS)
        for workload in ("singles", "batches")
        for clients in (1, 8, 64)
    ]
    offered = [
        _load_point(system, rate, min(rate, 20.0), 30.0 if rate <= 16 else 900.0)
        for system in SYSTEMS
        for rate in (1.0, 4.0, 16.0, 64.0)
    ]
    zipf = [
        ZipfPoint(
            system=system,
            s=s,
            hit_rate=0.5 * s,
            ideal_hit_rate=0.55 * s,
            texts_per_s=100.0 * s,
            p50_ms=5.0,
            p95_ms=50.0,
            p99_ms=90.0,
        )
        for system in SYSTEMS[:2]
        for s in (0.8, 1.2)
    ]
    startup = [
        StartupRun(
            backend=backend,
            ready_s=4.0,
            cpu_s=3.5,
            rss_ready_mib=300.0,
            peak_start_mib=350.0,
            rss_after_mib=320.0,
            first_ms=30.0,
            steady_ms=15.0,
        )
        for backend in ("torch", "onnx fp32", "onnx int8")
    ]
    return Report(
        plan=QUICK.as_dict(),
        machine=schema.Machine(
            cpu="Test CPU",
            instructions="AVX2, no VNNI",
            cores=2,
            memory_gib=24.0,
            kernel="6.1",
            load_start=[0.1, 0.2, 0.3],
            load_end=[1.0, 0.5, 0.4],
            started="2026-12-03T08:00:00+00:00",
            finished="2026-12-03T08:30:00+00:00",
        ),
        versions={"python": "3.11.7", "embedpipe": "abc123", "infinity-emb": "0.0.78"},
        corpus="a hand-made corpus",
        peers=[schema.Peer(name="Infinity 0.0.78", measured=True, note="its own venv")],
        raw=schema.Raw(batches_texts_per_s=20.0, singles_texts_per_s=15.0),
        concurrency=concurrency,
        offered_load=offered,
        zipf=zipf,
        backends=[
            schema.BackendResult(
                backend=name,
                texts_per_s=rate,
                best_texts_per_s=rate * 1.1,
                cos_mean=cos,
                cos_min=cos - 0.01,
                top10=0.95,
            )
            for name, rate, cos in (("torch", 80.0, 1.0), ("onnx int8", 120.0, 0.99))
        ],
        startup=startup,
        rss_mib={"embedpipe": 700.0, "naive": 1200.0},
        seconds={"throughput against concurrency": 600.0, "hit rate against Zipf skew": 125.0},
    )


def test_the_page_and_plots_are_rendered_from_the_results(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "report.json"
    schema.save(_report(), results)
    report = schema.load(results)  # what --render-only reads back
    written = plots.draw_all(report, tmp_path / page.IMAGES)
    assert [path.name for path in written] == list(plots.PLOTS)
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), path
    template = "# Benchmarks\n\nBefore.\n\n" + page.START + "\nold\n" + page.END + "\n\n## After\n"
    rendered = page.splice(template, page.render(report))
    assert rendered.startswith("# Benchmarks\n\nBefore.\n\n") and rendered.endswith("## After\n")
    assert "\nold\n" not in rendered
    for heading in page.SECTIONS:
        assert f"\n{heading}\n" in rendered, heading
    for name in plots.PLOTS:
        assert f"]({page.IMAGES}/{name})" in rendered, name
    facts = (
        "Test CPU (AVX2, no VNNI)",
        "2026-12-03T08:00:00+00:00",
        "embedpipe abc123",
        "A `--quick` run",
    )
    for fact in (*facts, "throughput against concurrency 10.0 min"):
        assert fact in rendered, fact
    assert "| embedpipe | 16 |" in rendered  # the knee, in its table
    again = page.splice(rendered, page.render(report))
    assert again == rendered  # rendering twice changes nothing


def test_the_readme_block_shows_two_plots_of_the_page() -> None:
    block = page.readme_block(_report())
    for name in page.README_PLOTS:
        assert f"](docs/{page.IMAGES}/{name})" in block
    assert set(page.README_PLOTS) <= set(plots.PLOTS)


def test_a_page_without_markers_is_refused() -> None:
    with pytest.raises(page.MarkersMissing):
        page.splice("# Benchmarks\n", "generated")


@pytest.mark.parametrize(
    ("p99s", "achieved", "expected"),
    [
        ((30, 40, 80, 89), (1, 4, 16, 64), 64.0),  # within 3x the lowest rate's p99 throughout
        ((30, 40, 95, 60), (1, 4, 16, 64), 4.0),  # p99 past 3x at 16/s: the knee stays below
        ((30, 40, 50, 60), (1, 4, 16, 30), 16.0),  # answers fell behind the rate at 64/s
        ((30, 40, 50, 60), (0.5, 4, 16, 64), None),  # not even the lowest rate kept up
    ],
)
def test_the_knee_follows_the_stated_rule(
    p99s: tuple[float, ...], achieved: tuple[float, ...], expected: float | None
) -> None:
    points = [
        _load_point("embedpipe", rate, got, p99)
        for rate, got, p99 in zip((1.0, 4.0, 16.0, 64.0), achieved, p99s, strict=True)
    ]
    assert knee(points) == expected


def test_a_rate_with_errors_or_no_answers_is_past_the_knee() -> None:
    points = [_load_point("embedpipe", 1.0, 1.0, 30.0), _load_point("embedpipe", 4.0, 4.0, 30.0)]
    points[1]["errors"] = 3
    assert knee(points) == 1.0
    points[1] = _load_point("embedpipe", 4.0, 0.0, math.nan)
    assert knee(points) == 1.0


def test_fresh_texts_never_repeat_a_text_within_a_run() -> None:
    texts = FreshTexts(("a", "b", "c"))
    assert texts.take(2) == ["a", "b"]
    assert texts.take(5) == ["c", "(1) a", "(1) b", "(1) c", "(2) a"]


def test_a_plan_can_be_trimmed_to_fewer_clients() -> None:
    trimmed = FULL.up_to(32)
    assert max(trimmed.single_clients) == max(trimmed.batch_clients) == 32
    assert trimmed.offered_rates == FULL.offered_rates


def test_each_goal_is_judged_from_the_numbers_and_a_missing_one_is_not_met() -> None:
    report = _report()
    by_goal = {verdict.goal: verdict for verdict in goals.verdicts(report)}
    singles_raw = by_goal["64 clients x 1 text >= 1.0x raw `encode` (batches of 32)"]
    # embedpipe 10 + 64 = 74 texts/s at 64 clients against raw's 20 in batches.
    assert singles_raw.met is True and singles_raw.measured.startswith("3.70x")
    # naive: 20 + 64 = 84 texts/s, more than embedpipe's 74.
    assert by_goal["64 clients x 1 text >= 1.5x the naive design"].met is False
    # The hand-made run has no ONNX fp32 row: no verdict, and never "met".
    assert by_goal["ONNX fp32 and int8 against torch"].met is None
    assert by_goal["onnx int8: /ready <= 3 s after start"].met is False  # 4 s
    assert by_goal["onnx fp32: first request after /ready <= 2x steady state"].met is True  # 2x
    assert by_goal["torch: resident memory with the model loaded <= 400 MiB"].met is True
    assert by_goal["onnx fp32: resident memory with the model loaded <= 250 MiB"].met is False
    rendered = page.render(report)
    assert "| 64 clients x 1 text >= 1.5x the naive design | 0.88x (74.0 / 84.0 texts/s) |" in (
        rendered
    )


def test_a_point_a_server_failed_is_shown_as_failed_and_drawn_without_it(tmp_path: Path) -> None:
    report = _report()
    report["concurrency"].append(
        ConcurrencyPoint(
            system="naive",
            workload="batches",
            clients=128,
            requests=0,
            texts_per_s=math.nan,
            requests_per_s=math.nan,
            p50_ms=math.nan,
            p95_ms=math.nan,
            p99_ms=math.nan,
            failed="http://127.0.0.1:1/v1/embeddings answered 500: b'Internal Server Error'",
        )
    )
    row = "| 128 | - | failed: http://127.0.0.1:1/v1/embeddings answered 500"
    assert row in page.render(report)
    written = plots.draw_all(report, tmp_path)
    assert all(path.stat().st_size > 0 for path in written)
