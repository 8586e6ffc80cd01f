"""The slim image (deploy/slim.Dockerfile: ONNX Runtime, no torch), built from the full image
as the README says and run three ways: the compose stack with deploy/compose.slim.yaml laid
over compose.yaml (API and worker on the slim image), ``embedpipe embed`` in a container of
its own with no network, and one container started alone, where the figures the issue names
are measured (image size, /ready time, first request against steady state, resident memory).
Figures are printed at the end of the run, never asserted: this machine is shared."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai import OpenAI

from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.server_process import free_port
from tests.stack.conftest import KEYS, Stack, running_stack
from tests.stack.engine import Docker
from tests.stack.images import Images, build_slim, copied_layer_bytes, image_bytes

FORBIDDEN = ("torch", "transformers", "sentence_transformers")
TEXTS = ["The slim image serves embeddings.", "Une phrase en français.", "x" * 300]

# Run in a container by its own python: what the image holds, biggest first.
_CONTENTS = """
import importlib.util, json, pathlib, sys
def size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
site = pathlib.Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
packages = {p.name: size(p) for p in (site / "site-packages").iterdir() if p.is_dir()}
exports = {p.name: size(p) for p in pathlib.Path("/opt/embedpipe/onnx").iterdir() if p.is_dir()}
print(json.dumps({
    "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m)],
    "venv": size(pathlib.Path(sys.prefix)),
    "packages": sorted(packages.items(), key=lambda kv: -kv[1])[:8],
    "exports": exports,
}))
"""

# Resident memory of the container's main process (PID 1, the embedpipe command): totals,
# and the mappings that hold the most (anonymous heap, ONNX Runtime, numpy's BLAS, ...).
_MEMORY = """
import collections, json, re
status = dict(line.split(":", 1) for line in open("/proc/1/status").read().splitlines())
kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
mapped, name = collections.Counter(), "?"
for line in open("/proc/1/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        parts = line.split()
        name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anonymous]"
    elif line.startswith("Rss:"):
        mapped[name] += int(line.split()[1])
print(json.dumps({"kib": kib, "top": mapped.most_common(6)}))
"""


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


@pytest.fixture(scope="module")
def slim_image(docker: Docker, repository: Path, images: Images, figures: dict[str, str]) -> str:
    seconds = build_slim(docker, repository, images)
    name = images.names["embedpipe-slim"]
    size, base = image_bytes(docker, name), image_bytes(docker, images.names["python"])
    wheels = copied_layer_bytes(docker, images.names["python"])
    figures["slim image built in (from the full image)"] = f"{seconds:.0f} s"
    figures["slim image size"] = (
        f"{size / 1e6:.0f} MB ({(size - base) / 1e6:.0f} MB over its python base, "
        f"the stand-in of {base / 1e6:.0f} MB); the full image "
        f"{image_bytes(docker, images.names['embedpipe']) / 1e6:.0f} MB"
    )
    # The stand-in carries this machine's wheel folder for the builds; the official python
    # image does not. Less that layer: the image on a plain Debian python3 base.
    figures["slim image on a plain Debian python base"] = (
        f"{(size - wheels) / 1e6:.0f} MB (base {(base - wheels) / 1e6:.0f} MB; the stand-in's "
        f"wheel folder, {wheels / 1e6:.0f} MB, left out)"
    )
    return name


@pytest.fixture(scope="module")
def slim_stack(
    docker: Docker,
    repository: Path,
    images: Images,
    slim_image: str,
    figures: dict[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    """compose.yaml with compose.slim.yaml over it: one API replica, one worker. Down at the
    end of this module (the full stack of test_stack.py does not run beside it)."""
    with running_stack(
        docker,
        repository,
        images,
        request,
        figures,
        project=f"embedpipe-slim-{images.tag}",
        files=("deploy/compose.yaml", "deploy/compose.slim.yaml"),
        scale={"api": 1, "worker": 1},
    ) as stack:
        figures["slim stack: time to healthy (compose up --wait)"] = f"{stack.up_seconds:.0f} s"
        yield stack


def run_in_image(docker: Docker, image: str, *args: str, timeout: float = 300) -> str:
    """A throwaway container of ``image`` with no network: its stdout."""
    done = docker.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python",
        image,
        *args,
        timeout=timeout,
    )
    return done.stdout


def test_the_slim_image_holds_no_torch_stack(
    docker: Docker, slim_image: str, figures: dict[str, str]
) -> None:
    held = json.loads(run_in_image(docker, slim_image, "-c", _CONTENTS, *FORBIDDEN))
    assert held["importable"] == []
    assert set(held["exports"]) and all(
        name.endswith(("-fp32", "-int8")) or name == "calibration" for name in held["exports"]
    ), held["exports"]
    figures["slim image: venv"] = f"{held['venv'] / 1e6:.0f} MB; biggest: " + ", ".join(
        f"{name} {size / 1e6:.0f}" for name, size in held["packages"]
    )
    figures["slim image: exports"] = ", ".join(
        f"{name} {size / 1e6:.1f} MB" for name, size in sorted(held["exports"].items())
    )


def _client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=KEYS["main"], max_retries=0, timeout=120)


def test_the_slim_stack_serves_the_reference_models_vectors_and_int8(
    slim_stack: Stack, reference_model: Any
) -> None:
    with _client(slim_stack) as client:
        reply = client.embeddings.create(model=MODEL, input=TEXTS)
        got = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
        assert_same_vectors(got, reference_vectors(reference_model, TEXTS))
        # int8 needs the model's ranges: made ahead beside the exports, in the image.
        # As JSON integers: the SDK would read base64 (its default) as float32.
        int8 = client.embeddings.create(
            model=MODEL, input=TEXTS, encoding_format="float", extra_body={"embedding_type": "int8"}
        )
    for item in int8.data:
        values = np.asarray(item.embedding)
        assert values.shape == (384,) and values.min() >= -128 and values.max() <= 127
    (api,) = slim_stack.containers("api")
    ((status, stats),) = slim_stack.call(api, "/stats", key=KEYS["main"])
    assert status == 200 and [m["backend"] for m in json.loads(stats)["models"]] == ["onnx"]
    logs = slim_stack.docker.run("logs", api)
    assert "calibrating" not in logs.stdout + logs.stderr  # nothing computed at start


def test_a_batch_job_runs_on_the_slim_worker(slim_stack: Stack, reference_model: Any) -> None:
    texts = texts_for(40, "slim")
    with _client(slim_stack) as client:
        batch = submit(client, [request_line(key, text) for key, text in texts.items()])
        done = wait_for(client, batch.id, ("completed", "failed"), timeout=600)
        assert done.status == "completed", done
        vectors = vectors_by_custom_id(read_lines(client, done.output_file_id))
    assert set(vectors) == set(texts)
    keys = sorted(texts)[:5]
    assert_same_vectors(
        [vectors[key] for key in keys],
        reference_vectors(reference_model, [texts[key] for key in keys]),
    )
    (worker,) = slim_stack.containers("worker")
    ((status, metrics),) = slim_stack.call(worker, "/metrics", port=9101)
    assert status == 200 and "embedpipe_job_items_total" in metrics


@pytest.mark.parametrize("source, output", [("in.jsonl", "out.npy"), ("in.parquet", "out.parquet")])
def test_embed_runs_in_the_slim_image_offline(
    docker: Docker, slim_image: str, work: Path, reference_model: Any, source: str, output: str
) -> None:
    """Parquet both ways too: the image's pyarrow is trimmed (deploy/slim-prune.sh)."""
    folder = work / f"slim-embed-{Path(source).suffix[1:]}"
    folder.mkdir()
    folder.chmod(0o777)  # the image's user (uid 10001) writes the output here
    if source.endswith(".parquet"):
        pq.write_table(pa.table({"text": TEXTS}), folder / source)
    else:
        (folder / source).write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    docker.run(
        "run", "--rm", "--network", "none", "--volume", f"{folder}:/io", slim_image,
        "embed", f"/io/{source}", "--output", f"/io/{output}", "--quiet",
        timeout=300,
    )  # fmt: skip
    if output.endswith(".parquet"):
        vectors = np.array(pq.read_table(folder / output).column("embedding").to_pylist())
    else:
        vectors = np.load(folder / output)
    assert_same_vectors(vectors, reference_vectors(reference_model, TEXTS))


def _memory(docker: Docker, container: str) -> dict[str, Any]:
    done = docker.run("exec", container, "python", "-c", _MEMORY)
    measured: dict[str, Any] = json.loads(done.stdout)
    return measured


def test_one_slim_container_started_alone_measured(
    docker: Docker, slim_image: str, slim_stack: Stack, figures: dict[str, str]
) -> None:
    """`docker run -p ... embedpipe:slim` (embedded mode, no Redis), as a user would start it,
    three times: seconds to /ready, the first request after it against the steady state, and
    the resident memory with the model loaded. Printed, not asserted."""
    runs = [_start_and_measure(docker, slim_image, slim_stack.project, n) for n in range(3)]
    figures["slim alone: /ready after docker run (3 starts)"] = ", ".join(
        f"{run['ready']:.1f} s" for run in runs
    )
    figures["slim alone: first request after /ready"] = "; ".join(
        f"{run['first'] * 1000:.0f} ms = {run['first'] / run['steady']:.2f}x the steady median "
        f"{run['steady'] * 1000:.1f} ms"
        for run in runs
    )
    figures["slim alone: resident memory once ready"] = ", ".join(
        mib(run["loaded"]["kib"]["VmRSS"]) for run in runs
    )
    loaded = runs[-1]["loaded"]
    figures["slim alone: where (last start)"] = (
        f"anonymous {mib(loaded['kib']['RssAnon'])}, files {mib(loaded['kib']['RssFile'])}, "
        f"peak {mib(loaded['kib']['VmHWM'])}; biggest: "
        + ", ".join(f"{n} {mib(k)}" for n, k in loaded["top"])
    )
    figures["slim alone: resident memory after 21 requests"] = ", ".join(
        mib(run["served"]["kib"]["VmRSS"]) for run in runs
    )


def _start_and_measure(docker: Docker, image: str, project: str, n: int) -> dict[str, Any]:
    port = free_port()
    name = f"{project}-alone-{n}"
    started = time.monotonic()
    docker.run(
        "run", "--detach", "--name", name,
        # The stack's network: this engine has no default bridge to publish from.
        "--network", f"{project}_backend",
        "--publish", f"127.0.0.1:{port}:8000", image,
        timeout=120,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            ready = _wait_ready(http, started)
            loaded = _memory(docker, name)
            latencies = []
            for count in range(21):  # a new text each time: every one is computed
                sent = time.perf_counter()
                body = {"model": MODEL, "input": f"text {count} of start {n}"}
                reply = http.post("/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - sent)
                assert reply.status_code == 200, reply.text
        served = _memory(docker, name)
    finally:
        docker.run("rm", "--force", name, check=False)
    return {
        "ready": ready,
        "first": latencies[0],
        "steady": statistics.median(latencies[1:]),
        "loaded": loaded,
        "served": served,
    }


def _wait_ready(http: httpx.Client, started: float, timeout: float = 180) -> float:
    """Seconds from ``started`` to the first 200 of /ready, polled every 50 ms."""
    while time.monotonic() - started < timeout:
        try:
            if http.get("/ready", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s")
