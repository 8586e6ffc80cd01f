"""The /dashboard page in a real browser (Debian's headless Chromium) against a real server:
it loads with no network but the server, polls /stats and draws the charts."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.browser]

WIDTH, HEIGHT = 1400, 1000
# Set to a path to keep the screenshot (the README's docs/dashboard.png is made this way).
SCREENSHOT_ENV = "EMBEDPIPE_DASHBOARD_SCREENSHOT"


def _chromium(profile: Path, *args: str) -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is missing: `make test` installs it (Debian package chromium)")
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={WIDTH},{HEIGHT}",
            # Let the page's first /stats poll finish and render before the capture.
            "--virtual-time-budget=4000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _traffic(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i in range(20):
            assert http.post("/embed", json={"text": f"dashboard {i % 4}"}).status_code == 200
            reply = http.post("/embed/batch", json={"texts": [f"page {i}", "page", "dash"]})
            assert reply.status_code == 200


def test_the_page_is_one_static_file_with_nothing_from_outside(
    embedded_server: ServerProcess,
) -> None:
    reply = httpx.get(f"{embedded_server.url}/dashboard", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", reply.text)
    assert 'fetch("stats"' in reply.text


def test_stats_carry_what_the_page_draws(embedded_server: ServerProcess) -> None:
    _traffic(embedded_server)
    stats = httpx.get(f"{embedded_server.url}/stats", timeout=10).json()
    assert stats["rate_limited"] == {} or all(v >= 0 for v in stats["rate_limited"].values())
    traffic = stats["traffic"]
    recent = traffic["recent"]
    assert recent["requests"] >= 40 and recent["inputs"] >= 80
    assert 0 < recent["hit_ratio"] < 1
    assert 0 < recent["p50_ms"] <= recent["p95_ms"] <= recent["p99_ms"]
    assert len(traffic["timeline"]) == 72 and traffic["slot_seconds"] == 5
    assert sum(point["requests"] for point in traffic["timeline"]) >= 40
    assert set(stats["queue_depth"]) == {MODEL}


def test_headless_chromium_renders_live_charts(
    embedded_server: ServerProcess, tmp_path: Path
) -> None:
    _traffic(embedded_server)
    url = f"{embedded_server.url}/dashboard"
    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert 'data-state="live"' in dom, dom[:2000]
    p95 = re.search(r'id="p95">([^<]*)<', dom)
    hit = re.search(r'id="hit">([^<]*)<', dom)
    assert p95 and float(p95.group(1)) > 0
    assert hit and 0 < float(hit.group(1)) <= 100
    for chart in ("throughput", "latency", "hits", "queue"):
        svg = re.search(rf'<svg id="chart-{chart}".*?</svg>', dom, re.S)
        assert svg and re.search(r'<path d="M[\d.]+,[\d.]+', svg.group(0)), chart
    assert f"<td>{MODEL}</td>" in dom

    screenshot = tmp_path / "dashboard.png"
    _chromium(tmp_path / "profile-png", f"--screenshot={screenshot}", url)
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
    assert len(png) > 30_000  # drawn, not blank
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(screenshot, keep)
