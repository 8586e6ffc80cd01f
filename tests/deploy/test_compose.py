"""deploy/compose.yaml, .env.example and the nginx config, checked without a Docker engine:
the compose specification's schema (vendored in check-jsonschema, offline), every setting and
command the stack names exists in embedpipe, every file it mounts exists, health checks gate
the start order, and nginx accepts its config (``nginx -t``). The same topology runs as plain
processes in test_topology.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.core import TyperGroup
from typer.main import get_command

from embedpipe.cli import app
from embedpipe.settings import Settings
from tests.deploy.stack import (
    COMPOSE_FILE,
    DEPLOY,
    DOCKERFILE,
    DOT_ENV_FILE,
    ENV_EXAMPLE,
    NGINX_CONF,
    SLIM_COMPOSE_FILE,
    MissingVariable,
    compose,
    environment,
    interpolate,
    nginx_binary,
    parse_dockerfile,
    raw_compose,
    read_env_file,
    redis_options,
    setting_env_names,
    variables_used,
)

# What a user must add to a copied .env.example before the first `up`.
FIRST_RUN = {
    "GRAFANA_ADMIN_PASSWORD": "a-password-of-the-test",
    "EMBEDPIPE_API_KEYS": "sk-first,sk-second",
    "STACK_REDIS_PASSWORD": "0123456789abcdef",
}
EMBEDPIPE_SERVICES = ("api", "worker")


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return compose(FIRST_RUN)


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "check-jsonschema"
    if not binary.exists():
        pytest.fail("check-jsonschema is missing: `make install` installs the dev dependencies")
    return subprocess.run(
        # The compose-spec schema shipped inside check-jsonschema: no download.
        [str(binary), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compose_file_follows_the_compose_specification(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    done = _check_jsonschema(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    # And once interpolated with .env.example, as compose validates it.
    interpolated = tmp_path / "compose.yaml"
    interpolated.write_text(yaml.safe_dump(stack))
    done = _check_jsonschema(interpolated)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_does_catch_a_wrong_file(tmp_path: Path) -> None:
    wrong = dict(raw_compose())
    wrong["services"] = {**wrong["services"], "api": {**wrong["services"]["api"], "replica": 2}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(wrong))
    done = _check_jsonschema(path)
    assert done.returncode != 0 and "replica" in done.stdout


def test_every_variable_comes_from_env_example_and_every_one_is_used() -> None:
    used = variables_used(COMPOSE_FILE.read_text())
    example = read_env_file()
    assert not set(used) - set(example), set(used) - set(example)
    # The rest reaches the replicas through env_file (EMBEDPIPE_*) or compose itself.
    unused = {name for name in set(example) - set(used) if not name.startswith("COMPOSE_")}
    assert all(name.startswith("EMBEDPIPE_") for name in unused), unused
    # A default in compose.yaml is the value .env.example gives, so the two cannot drift.
    for name, default in used.items():
        if default is not None:
            assert default == example[name], f"{name}: compose {default!r}, .env.example"


@pytest.mark.parametrize("required", sorted(FIRST_RUN))
def test_compose_refuses_to_start_without_keys_and_passwords(required: str) -> None:
    """The API keys, the Redis password and Grafana's: none has a default."""
    with pytest.raises(MissingVariable, match=required):
        compose({**FIRST_RUN, required: ""})  # as .env.example leaves it: empty


def test_grafana_gets_its_password_and_starts_only_with_its_profile() -> None:
    assert raw_compose()["services"]["grafana"]["profiles"] == ["grafana"]
    assert read_env_file()["COMPOSE_PROFILES"] == "grafana"  # on by default for users
    grafana = environment(compose(FIRST_RUN)["services"]["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == FIRST_RUN["GRAFANA_ADMIN_PASSWORD"]
    assert "admin" not in interpolate("${GRAFANA_ADMIN_PASSWORD:?}", FIRST_RUN)


def test_every_embedpipe_variable_is_a_setting() -> None:
    known = setting_env_names()
    named = {name for name in read_env_file() if name.startswith("EMBEDPIPE_")}
    for service in EMBEDPIPE_SERVICES:
        named |= set(environment(raw_compose()["services"][service]))
    assert named and not named - known, named - known


def test_a_copied_env_example_changes_nothing_for_a_local_embedpipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`embedpipe` reads .env from its working folder: the repository's .env, made from this
    example for compose, must leave a local `embedpipe serve` on its defaults."""
    for name in os.environ:
        if name.startswith("EMBEDPIPE_"):
            monkeypatch.delenv(name)
    from_example = Settings(_env_file=ENV_EXAMPLE)
    assert from_example.model_dump() == Settings(_env_file=None).model_dump()


@pytest.mark.parametrize("service", EMBEDPIPE_SERVICES)
def test_the_settings_a_service_gets_are_valid(
    stack: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:
        if name.startswith("EMBEDPIPE_"):
            monkeypatch.delenv(name)
    for name, value in environment(stack["services"][service]).items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.host == "0.0.0.0"
    assert str(settings.data_dir) == "/data"
    # The cache (evicting) and the broker (never evicting) are two Redis services, both
    # behind the password of .env.
    cache_host = re.fullmatch(r"redis://:(\w+)@([\w-]+):6379/\d+", settings.redis_url)
    broker_host = re.fullmatch(r"redis://:(\w+)@([\w-]+):6379/\d+", settings.broker_url)
    assert cache_host and broker_host
    assert cache_host[2] == "redis-cache" and broker_host[2] == "redis-broker"
    assert cache_host[1] == broker_host[1] == FIRST_RUN["STACK_REDIS_PASSWORD"]
    if service == "api":
        assert settings.port == 8000
    else:
        assert settings.jobs.worker_metrics_port == 9101


def test_every_embedpipe_setting_of_dot_env_reaches_the_replicas_and_workers() -> None:
    """env_file: a setting .env.example does not list (here per-tenant caching and protected
    metrics) reaches every replica and worker all the same; the stack's own values win."""
    extra = {
        "EMBEDPIPE_CACHE__PER_TENANT": "true",
        "EMBEDPIPE_SECURITY__PROTECT_METRICS": "true",
        "EMBEDPIPE_API_KEYS_FILE": "/data/keys.toml",
    }
    stack = compose({**FIRST_RUN, **extra})
    dot_env = {**read_env_file(), **FIRST_RUN, **extra}
    for service in EMBEDPIPE_SERVICES:
        env = environment(stack["services"][service])
        for name, value in dot_env.items():
            if name.startswith("EMBEDPIPE_"):
                assert env[name] == value, (service, name)
        assert env["EMBEDPIPE_DATA_DIR"] == "/data"


def test_the_two_redis_are_configured_for_their_jobs(stack: dict[str, Any]) -> None:
    for service in ("redis-cache", "redis-broker"):
        options = redis_options(stack["services"][service])
        assert options["requirepass"] == FIRST_RUN["STACK_REDIS_PASSWORD"], service
        # The health check's redis-cli authenticates from its environment, not argv.
        assert environment(stack["services"][service]) == {
            "REDISCLI_AUTH": FIRST_RUN["STACK_REDIS_PASSWORD"]
        }
    cache = redis_options(stack["services"]["redis-cache"])
    assert re.fullmatch(r"\d+[kmg]b", cache["maxmemory"]) and cache["maxmemory"][0] != "0"
    assert cache["maxmemory-policy"] in ("allkeys-lfu", "allkeys-lru")
    broker = redis_options(stack["services"]["redis-broker"])
    assert broker["maxmemory-policy"] == "noeviction"
    assert broker["appendonly"] == "yes"
    assert any(v.endswith(":/data") for v in stack["services"]["redis-broker"]["volumes"])


def test_services_run_embedpipe_commands_that_exist(stack: dict[str, Any]) -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    (entrypoint,) = [i.exec_form() for i in instructions if i.keyword == "ENTRYPOINT"]
    cli = get_command(app)
    assert isinstance(cli, TyperGroup)
    for name in EMBEDPIPE_SERVICES:
        service = stack["services"][name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        args = [*entrypoint, *service["command"]][1:]
        assert args[0] == {"api": "serve", "worker": "worker"}[name]
        parent = cli.make_context("embedpipe", list(args), resilient_parsing=True)
        command, sub, rest = cli.resolve_command(parent, list(args))
        assert sub is not None, command
        sub.make_context(command, rest, parent=parent)  # raises on an unknown option


def test_the_api_scales_behind_one_published_port(stack: dict[str, Any]) -> None:
    services = stack["services"]
    api, worker, lb = services["api"], services["worker"], services["lb"]
    assert int(api["deploy"]["replicas"]) >= 2
    assert int(worker["deploy"]["replicas"]) >= 2
    for scaled in (api, worker):
        # A published port or a fixed name would clash as soon as there are two.
        assert "ports" not in scaled and "container_name" not in scaled
    # On loopback unless .env opens it, like Grafana.
    assert lb["ports"] == ["127.0.0.1:8000:8000"]
    assert stack["services"]["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    opened = compose({**FIRST_RUN, "STACK_BIND_ADDRESS": "0.0.0.0"})["services"]["lb"]
    assert opened["ports"] == ["0.0.0.0:8000:8000"]
    assert re.search(r"^\s*listen 8000;", NGINX_CONF.read_text(), re.MULTILINE)
    assert lb["depends_on"] == {"api": {"condition": "service_healthy"}}


def test_health_checks_gate_every_dependency(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, (name, dependency)
            assert dependency in services
    for name in EMBEDPIPE_SERVICES:
        assert set(services[name]["depends_on"]) == {"redis-cache", "redis-broker"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_every_mounted_file_exists_and_the_data_dir_is_shared(stack: dict[str, Any]) -> None:
    named = set(stack["volumes"])
    data_volumes = set()
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"
            if name in EMBEDPIPE_SERVICES:
                data_volumes.add((source, target))
    assert data_volumes == {("embedpipe-data", "/data")}


def test_every_image_is_pinned(stack: dict[str, Any]) -> None:
    for name, service in stack["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        if name in EMBEDPIPE_SERVICES:
            assert image == "embedpipe:local" and "build" in service
        else:
            assert re.fullmatch(r"v?\d+\.\d+\.\d+(-\w+)?", tag), f"{name}: {image}"


def test_prometheus_discovers_every_api_replica_and_worker(stack: dict[str, Any]) -> None:
    prometheus = stack["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    config_file = next(f for f in prometheus["command"] if f.startswith("--config.file="))
    config_path = config_file.partition("=")[2]
    source = {target: source for source, target in mounts.items()}[config_path]
    config = yaml.safe_load((DEPLOY / source).read_text())
    # The rule files it names are mounted beside it.
    for rules in config["rule_files"]:
        assert str(Path(config_path).parent / rules) in mounts.values(), rules
    discovered = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    api_env = environment(stack["services"]["api"])
    worker_env = environment(stack["services"]["worker"])
    assert ("api", int(api_env["EMBEDPIPE_PORT"])) in discovered
    assert ("worker", int(worker_env["EMBEDPIPE_JOBS__WORKER_METRICS_PORT"])) in discovered


def test_grafana_gets_the_provisioned_datasource_and_dashboard(stack: dict[str, Any]) -> None:
    grafana = stack["services"]["grafana"]
    mounts = {target: source for source, target in (v.split(":")[:2] for v in grafana["volumes"])}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "embedpipe.yml").read_text())[
        "providers"
    ]
    dashboards = DEPLOY / mounts[provider["options"]["path"]]
    assert (dashboards / "embedpipe.json").exists()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert url and url[1] in stack["services"] and url[2] == "9090"


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    """The file goes into nginx's http block (conf.d), as in the nginx image."""
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {NGINX_CONF};\n}}\n"
    )
    done = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_nginx_sends_to_every_replica_and_lets_the_api_answer_errors(
    stack: dict[str, Any],
) -> None:
    conf = NGINX_CONF.read_text()
    # Re-resolved through Docker's DNS, so scaled replicas join without a reload.
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s", conf, re.MULTILINE)
    target = re.search(r"set \$(\w+) ([\w-]+):(\d+);", conf)
    assert target and f"proxy_pass http://${target[1]};" in conf
    assert target[2] == "api"
    assert target[3] == environment(stack["services"]["api"])["EMBEDPIPE_PORT"]
    # The API's own limits answer first, in OpenAI's envelope.
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size[1]) * 2**20 > Settings().jobs.max_file_bytes
    assert "proxy_add_x_forwarded_for" in conf
    trusted = environment(stack["services"]["api"])["EMBEDPIPE_SECURITY__TRUSTED_PROXIES"]
    subnets = [c["subnet"] for c in stack["networks"]["backend"]["ipam"]["config"]]
    assert trusted.split(",") == subnets


def test_env_example_is_the_only_settings_file() -> None:
    """One place for every setting: the embedpipe services read the .env the user passes
    with --env-file (made from .env.example), and no other file."""
    assert ENV_EXAMPLE.exists()
    for name, service in raw_compose()["services"].items():
        expected = DOT_ENV_FILE if name in EMBEDPIPE_SERVICES else None
        assert service.get("env_file") == expected, name


def test_nginx_skips_a_draining_replica_where_a_request_may_be_sent_twice() -> None:
    """A replica answers 503 from SIGTERM until its listener closes: nginx sends the request
    to another one, POSTs included, except where a POST creates state (files, batches). Run
    for real in tests/stack (a replica stopped under load: no client error)."""
    conf = NGINX_CONF.read_text()
    locations = dict(re.findall(r"\n    location (.+?) \{(.*?)\n    \}", conf, re.DOTALL))
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in locations["/"]
    stateful = locations["~ ^/v1/(files|batches)(/|$)"]
    assert "http_503" in stateful and "non_idempotent" not in stateful
    # Never a slow answer sent twice: only within a short time of the first try.
    assert re.search(r"proxy_next_upstream_timeout \d+s;", conf)


# --- deploy/compose.slim.yaml: the API replicas and workers on the slim image ---


def test_the_slim_override_follows_the_compose_specification() -> None:
    done = _check_jsonschema(SLIM_COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_slim_override_puts_only_the_embedpipe_services_on_the_slim_image(
    stack: dict[str, Any],
) -> None:
    text = SLIM_COMPOSE_FILE.read_text()
    # Its variables are compose.yaml's, with the same defaults: .env.example covers them.
    full_variables = variables_used(COMPOSE_FILE.read_text())
    for name, default in variables_used(text).items():
        assert name in full_variables and default == full_variables[name], name
    variables = {**read_env_file(), **FIRST_RUN}
    slim = yaml.safe_load(interpolate(text, variables))
    assert set(slim["services"]) == set(EMBEDPIPE_SERVICES)
    for name in EMBEDPIPE_SERVICES:
        service, full = slim["services"][name], stack["services"][name]
        assert service["image"] == "embedpipe-slim:local" != full["image"]
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "slim.Dockerfile"
        )
        # Built from the image compose.yaml builds, on the same base.
        assert build["args"]["FULL_IMAGE"] == full["image"]
        assert build["args"]["PYTHON_IMAGE"] == full["build"]["args"]["PYTHON_IMAGE"]
        # The replica counts stay compose.yaml's (the same variables).
        assert str(service["deploy"]["replicas"]) == str(full["deploy"]["replicas"])
        limit = service["deploy"]["resources"]["limits"]["memory"]
        assert limit == "1g" and full["deploy"]["resources"]["limits"]["memory"] == "2g"
