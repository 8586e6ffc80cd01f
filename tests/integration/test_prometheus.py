"""The monitoring files under deploy/, checked for real: promtool accepts the config and the
rules (and their unit tests), every PromQL expression of the rules and the Grafana dashboard
parses and names only metrics a live server exports, and a real Prometheus scraping a running
server answers the dashboard's p95 latency and hit-ratio queries with numbers."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess, free_port

pytestmark = [pytest.mark.prometheus]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "embedpipe.json"
# Grafana's interval variables, replaced by a fixed range for Prometheus.
_GRAFANA_VARIABLES = re.compile(
    r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}"
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make test` installs it (Debian package prometheus)")
    return path


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def dashboard_expressions(rate_range: str = "5m") -> list[str]:
    return [
        _GRAFANA_VARIABLES.sub(rate_range, target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


_STRINGS = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "inf", "nan"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label names, functions and keywords left out)."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"/x|y"}[5m] offset 1h)))'
        " / on (route) group_left b_total and c unless max without (x) (d:rec)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d:rec"}


def _alert_rules() -> dict[str, str]:
    """Each alert rule of alerts.yml: name -> expression."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = _tool("promtool")
    assert "SUCCESS" in _run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert f"SUCCESS: {len(_alert_rules())} rules found" in _run(
        promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")
    )


def test_the_alert_rules_fire_when_they_should() -> None:
    promtool = _tool("promtool")
    assert "SUCCESS" in _run(
        promtool, "test", "rules", str(PROMETHEUS_DIR / "tests" / "alerts_test.yml")
    )


def test_the_rules_page_on_every_signal_the_issue_lists() -> None:
    exprs = _alert_rules()
    wanted = {
        "EmbedpipeHighErrorRatio": "embedpipe_http_requests_total",
        "EmbedpipeLatencyP99OverSLO": "embedpipe_http_request_duration_seconds_bucket",
        "EmbedpipeQueueNearLimit": "embedpipe_queue_capacity",
        "EmbedpipeCacheHitRatioCollapsed": "embedpipe_embeddings_total",
        "EmbedpipeRedisErrors": "embedpipe_cache_errors_total",
        "EmbedpipeUpstreamBreakerOpen": "embedpipe_upstream_breaker_open",
        "EmbedpipeTargetDown": "up",
    }
    for alert, metric in wanted.items():
        assert metric in metric_names(exprs[alert]), alert


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-expressions.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in _run(promtool, "check", "rules", str(path))


def test_the_dashboard_has_the_panels_the_issue_lists() -> None:
    titles = " | ".join(panel["title"].lower() for panel in dashboard_panels())
    for wanted in (
        "request rate",
        "error ratio",
        "p50 / p95 / p99",
        "embeddings/s by source",
        "hit ratio",
        "batch size distribution",
        "queue depth",
        "queue wait",
        "inference time",
        "tokens/s",
        "rate-limited",
        "job progress",
    ):
        assert wanted in titles, wanted
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "prometheus"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    datasources = [
        source
        for path in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.yml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    assert [(s["uid"], s["type"]) for s in datasources] == [("prometheus", "prometheus")]
    assert datasources[0]["url"].startswith("http://") and datasources[0]["access"] == "proxy"
    providers = [
        provider
        for path in sorted((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "embedpipe" and len({p["id"] for p in dashboard_panels()}) == len(
        dashboard_panels()
    )


# --- against a live server ---


def _traffic(server: ServerProcess, rounds: int, tag: str) -> None:
    """Repeated texts, so that some are cache hits."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for i in range(rounds):
            assert http.post("/embed", json={"text": f"{tag} {i % 5}"}).status_code == 200
            reply = http.post(
                "/v1/embeddings", json={"model": MODEL, "input": [f"{tag} x", f"{tag} {i}"]}
            )
            assert reply.status_code == 200


def exported_names(metrics_text: str) -> set[str]:
    """Every series name /metrics exposes, samples or not yet (a family without children)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"up"}  # Prometheus adds it to every scrape
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


@pytest.mark.model
@pytest.mark.server
def test_every_expression_names_only_metrics_the_server_exports(
    embedded_server: ServerProcess,
) -> None:
    _traffic(embedded_server, 3, "names")
    exported = exported_names(httpx.get(f"{embedded_server.url}/metrics", timeout=10).text)
    for expr in rule_expressions() + dashboard_expressions():
        unknown = metric_names(expr) - exported
        assert not unknown, f"{unknown} in {expr}"
    # And the issue's names are all there.
    for name in (
        "embedpipe_http_requests_total",
        "embedpipe_http_request_duration_seconds_bucket",
        "embedpipe_embeddings_total",
        "embedpipe_cache_errors_total",
        "embedpipe_batch_size_bucket",
        "embedpipe_batch_tokens_bucket",
        "embedpipe_inference_duration_seconds_bucket",
        "embedpipe_queue_depth",
        "embedpipe_queue_wait_seconds_bucket",
        "embedpipe_tokens_total",
        "embedpipe_rate_limited_total",
        "embedpipe_build_info",
        "embedpipe_model_info",
    ):
        assert name in exported, name


def series_names(metrics_text: str) -> set[str]:
    """The series /metrics really has samples of (a family without children has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {"up"} | {
        sample.name
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


@pytest.mark.model
@pytest.mark.server
@pytest.mark.redis
def test_every_metric_in_deploy_has_series_on_a_fresh_process(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    # rate(), the alerts and the panels have nothing to work on until a series exists: each
    # label value known in advance starts at 0 (limits in force, job statuses, cache tiers,
    # models served), before any event.
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
            "EMBEDPIPE_REDIS_URL": redis_url,
            "EMBEDPIPE_CACHE__NAMESPACE": namespace,
            "EMBEDPIPE_RATE_LIMIT_RPM": "600",
            "EMBEDPIPE_RATE_LIMIT_TPM": "100000",
            # An upstream model too (never called here: nothing listens there).
            "EMBEDPIPE_EXTRA_MODELS": "up=openai:text-embedding-3-small",
            "EMBEDPIPE_OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        },
        tmp_path / "server.log",
    ).start()
    try:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    used = {
        name for expr in rule_expressions() + dashboard_expressions() for name in metric_names(expr)
    }
    missing = sorted(used - series_names(text))
    assert not missing, f"no series on a fresh process: {missing}"
    for series in (
        'embedpipe_rate_limited_total{limit="requests"} 0.0',
        'embedpipe_rate_limited_total{limit="tokens"} 0.0',
        'embedpipe_jobs_total{status="completed"} 0.0',
        'embedpipe_jobs_total{status="failed"} 0.0',
        'embedpipe_job_items_total{status="succeeded"} 0.0',
        'embedpipe_cache_breaker_open{tier="l2"} 0.0',
        'embedpipe_upstream_requests_total{model="up",status="200"} 0.0',
        f'embedpipe_embeddings_total{{model="{MODEL}",source="shared"}} 0.0',
    ):
        assert series in text, series


@pytest.mark.model
@pytest.mark.server
def test_promtool_lints_the_exposition(embedded_server: ServerProcess) -> None:
    text = httpx.get(f"{embedded_server.url}/metrics", timeout=10).text
    done = subprocess.run(
        [_tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


class Prometheus:
    """A real prometheus process scraping one target every second, with our alert rules."""

    def __init__(self, root: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "embedpipe", "static_configs": [{"targets": [target]}]}
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def number(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else math.nan

    def wait_for(self, what: str, check: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def prometheus(
    embedded_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{embedded_server.port}")
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        server.wait_for("prometheus did not become ready", ready)
        server.wait_for(
            "the server was never scraped", lambda: server.number('up{job="embedpipe"}') == 1
        )
        yield server
    finally:
        server.stop()


def _panel_expr(title: str, legend: str, rate_range: str) -> str:
    panel = next(p for p in dashboard_panels() if p["title"].lower().startswith(title.lower()))
    target = next(t for t in panel["targets"] if t["legendFormat"] == legend)
    return _GRAFANA_VARIABLES.sub(rate_range, target["expr"])


@pytest.mark.model
@pytest.mark.server
def test_a_real_prometheus_answers_the_p95_and_hit_ratio_queries(
    prometheus: Prometheus, embedded_server: ServerProcess
) -> None:
    # A burst spread over a few scrapes, so that rates over the last seconds are not zero.
    for burst in range(3):
        _traffic(embedded_server, 8, f"prometheus {burst}")
        time.sleep(1.2)
    p95_expr = _panel_expr("p95 latency", "p95", "30s")
    hit_expr = _panel_expr("cache hit ratio", "hit ratio", "30s")

    def answered() -> bool:
        return all(math.isfinite(prometheus.number(expr)) for expr in (p95_expr, hit_expr))

    prometheus.wait_for("no p95 / hit ratio answer", answered, timeout=30)
    p95 = prometheus.number(p95_expr)
    hit_ratio = prometheus.number(hit_expr)
    assert 0 < p95 < 10, p95  # seconds
    assert 0 < hit_ratio < 1, hit_ratio  # "{tag} x" repeats, "{tag} {i}" mostly does not
    # What Prometheus stored is exactly what the server counted.
    series = 'embedpipe_http_requests_total{route="/embed",method="POST",status="200"}'
    expected = embedded_server.metric(
        "embedpipe_http_requests_total", route="/embed", method="POST", status="200"
    )
    prometheus.wait_for(
        "the last scrape does not match /metrics",
        lambda: prometheus.number(f"sum({series})") == expected,
        timeout=10,
    )
    print(f"prometheus: p95={p95 * 1000:.1f} ms, hit ratio={hit_ratio:.3f}, /embed={expected:.0f}")


@pytest.mark.model
@pytest.mark.server
def test_the_alert_rules_evaluate_against_real_data(prometheus: Prometheus) -> None:
    def evaluated() -> bool:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == len(_alert_rules()) and all(
            rule.get("lastEvaluation", "").startswith("2") and rule["health"] == "ok"
            for rule in rules
        )

    prometheus.wait_for("the rules do not all evaluate", evaluated, timeout=15)
    # The scraped server is up: neither "down" alert is pending or firing. (The others
    # depend on this shared machine's load, so they are left to the promtool unit tests.)
    raised = {alert["labels"]["alertname"] for alert in prometheus.query("ALERTS")}
    assert not raised & {"EmbedpipeTargetDown", "EmbedpipeAbsent"}, raised
