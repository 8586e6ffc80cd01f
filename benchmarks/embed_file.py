"""``embedpipe embed`` on a generated JSONL: end-to-end rows/s against the raw model, and the
process's resident memory sampled through the run (it must stay flat as rows go by).

    make bench-embed                      # or: python -m benchmarks.embed_file --rows 20000

The texts are standard-library docstrings cut to 40-200 characters and numbered, so every row
is distinct (no cache hits): the model does all the work, as on a fresh corpus. The raw model
encodes a sample of the same texts in batches of 32 in this process, after the run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from benchmarks.corpus import load_corpus
from benchmarks.throughput import bench_raw

console = Console()


def make_texts(rows: int) -> list[str]:
    base = load_corpus(500)
    return [f"{i}. {base[(i * 7) % 500][: 40 + (i * 13) % 160]}" for i in range(rows)]


def _rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def run(rows: int, chunk_size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        root = Path(tmp)
        texts = make_texts(rows)
        with (root / "in.jsonl").open("wb") as handle:
            for i, text in enumerate(texts):
                handle.write(orjson.dumps({"id": f"doc-{i}", "text": text}) + b"\n")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_REDIS_URL": "",
        }
        command = [sys.executable, "-m", "embedpipe", "embed", "in.jsonl", "-o", "out.parquet"]
        command += ["--id-field", "id", "--chunk-size", str(chunk_size), "-q"]
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        parts = root / "out.parquet.parts"
        samples: list[tuple[int, int]] = []  # (rows committed, RSS KiB)
        while process.poll() is None:
            rss = _rss_kib(process.pid)
            if rss is not None:
                samples.append((len(list(parts.glob("part-*.arrow"))) * chunk_size, rss))
            time.sleep(0.5)
        stderr = process.stderr.read().decode() if process.stderr else ""
        if process.returncode != 0:
            raise SystemExit(f"embedpipe embed failed:\n{stderr}")
        summary = stderr.strip().splitlines()[-1]
        found = re.search(r"\(([\d,.]+) rows/s\)", summary)
        if found is None:
            raise SystemExit(f"no rate in the summary: {summary}")
        rate = float(found.group(1).replace(",", ""))
        raw = bench_raw(texts[: min(rows, 4000)])

    table = Table("rows committed", "RSS MiB", title="resident memory through the run")
    running = [sample for sample in samples if sample[0] > 0]
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        if running:
            done, rss = running[min(len(running) - 1, int(fraction * len(running)))]
            table.add_row(f"{min(done, rows):,}", f"{rss / 1024:,.0f}")
    console.print(table)
    peak = max(rss for _, rss in samples)
    console.print(summary)
    console.print(
        f"rows: {rows:,}  embedpipe embed: {rate:,.0f} rows/s  raw model: {raw:,.0f} rows/s  "
        f"ratio: {rate / raw:.2f}  peak RSS: {peak / 1024:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    run(args.rows, args.chunk_size)


if __name__ == "__main__":
    main()
