"""Online latency beside a big batch job (issue 19): p50/p95/max of sequential online requests
alone, then while one batch of ``--lines`` x ``--inputs`` texts runs in the same server (the
embedded default: the in-process runner shares the model with online traffic), and the server's
peak resident memory during the batch.

    python -m benchmarks.batch_fairness --lines 30 --inputs 2048
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

from tests.memory import peak_bytes, reset_peak, rss_bytes
from tests.server_process import ServerProcess

MODEL = "all-MiniLM-L6-v2"


def _online(http: httpx.Client, count: int, tag: str) -> list[float]:
    took = []
    for index in range(count):
        started = time.perf_counter()
        answer = http.post("/v1/embeddings", json={"model": MODEL, "input": f"{tag} {index}"})
        answer.raise_for_status()
        took.append(time.perf_counter() - started)
    return took


def _summary(took: list[float]) -> str:
    p50 = statistics.median(took) * 1000
    p95 = statistics.quantiles(took, n=20)[-1] * 1000
    return f"p50 {p50:6.0f} ms  p95 {p95:6.0f} ms  max {max(took) * 1000:6.0f} ms  (n={len(took)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fairness-") as root:
        server = ServerProcess({"EMBEDPIPE_DATA_DIR": f"{root}/data"}, Path(root) / "server.log")
        server.start()
        try:
            assert server.process is not None
            pid = server.process.pid
            with httpx.Client(base_url=server.url, timeout=120) as http:
                _online(http, 5, "warm")
                print("alone:        ", _summary(_online(http, args.samples, "alone")))
                lines = [
                    json.dumps(
                        {
                            "custom_id": f"line-{line}",
                            "method": "POST",
                            "url": "/v1/embeddings",
                            "body": {
                                "model": MODEL,
                                "input": [f"batch text {line} {i}" for i in range(args.inputs)],
                            },
                        }
                    )
                    for line in range(args.lines)
                ]
                before = rss_bytes(pid)
                reset_peak(pid)
                with OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0) as sdk:
                    upload = sdk.files.create(
                        file=("big.jsonl", io.BytesIO("\n".join(lines).encode())),
                        purpose="batch",
                    )
                    batch = sdk.batches.create(
                        input_file_id=upload.id,
                        endpoint="/v1/embeddings",
                        completion_window="24h",
                    )
                    while sdk.batches.retrieve(batch.id).status == "validating":
                        time.sleep(0.05)
                    during = _online(http, args.samples, "beside")
                    state = sdk.batches.retrieve(batch.id)
                    print("beside batch: ", _summary(during), f"(batch still {state.status})")
                    started = time.monotonic()
                    while sdk.batches.retrieve(batch.id).status not in ("completed", "failed"):
                        time.sleep(0.5)
                    print(f"batch done {time.monotonic() - started:.0f} s after the samples")
                grown = (peak_bytes(pid) - before) / 2**20
                print(f"server peak RSS growth during the batch: {grown:.0f} MiB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
