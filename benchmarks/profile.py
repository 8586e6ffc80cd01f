"""Where a server's time goes under a workload: py-spy samples a real ``embedpipe serve`` while
the load generator drives it, and the samples are folded into a flat table of inclusive
shares per function (what the README's "where the time goes" paragraph quotes).

    python -m benchmarks.profile --workload hot        # 64 clients, cached texts
    python -m benchmarks.profile --workload singles    # 64 clients, unique texts

Only samples that hold the GIL are kept (``--gil``): time the process spends in Python or in
C code called with the GIL held, which is what competes with the event loop. py-spy needs
ptrace rights (root, or CAP_SYS_PTRACE in a container).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.corpus import load_corpus
from benchmarks.load import run_hot, run_singles, use_uvloop
from tests.server_process import ServerProcess


def fold(raw_stacks: str) -> tuple[int, Counter[str], Counter[str]]:
    """py-spy's collapsed stacks -> (samples, inclusive samples per function, self samples)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw_stacks.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_function(frame) for frame in stack.split(";")[1:]]  # [0] is the thread
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    return total, inclusive, own


def _function(frame: str) -> str:
    """``name (path/to/module.py:123)`` -> ``name (module.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("hot", "singles"), default="hot")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_uvloop()
    with tempfile.TemporaryDirectory(prefix="embedpipe-profile-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(
            {"EMBEDPIPE_DATA_DIR": str(workdir / "data"), "EMBEDPIPE_MODEL_THREADS": "0"},
            workdir / "server.log",
        ).start()
        try:
            assert server.process is not None
            texts = load_corpus(64) if args.workload == "hot" else load_corpus(2000)
            if args.workload == "hot":
                asyncio.run(run_hot(server.url, texts, 200))  # cached, warm
            output = workdir / "stacks.txt"
            command = [py_spy, "record", "--pid", str(server.process.pid), "--gil"]
            command += ["--rate", "100", "--duration", str(args.seconds), "--format", "raw"]
            command += ["--output", str(output)]
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

            async def drive() -> None:
                unsent = iter(range(0, len(texts), 256))  # singles: fresh texts each round
                while spy.poll() is None:
                    if args.workload == "hot":
                        await run_hot(server.url, texts, 2000)
                    elif (start := next(unsent, None)) is not None:
                        await run_singles(server.url, texts[start : start + 256])
                    else:
                        await asyncio.sleep(0.1)

            asyncio.run(drive())
            if spy.returncode != 0:
                error = spy.stderr.read().decode() if spy.stderr else ""
                raise SystemExit(f"py-spy failed (it needs ptrace rights):\n{error}")
            total, inclusive, own = fold(output.read_text())
        finally:
            server.stop()
    print(f"{total} samples holding the GIL over {args.seconds} s, workload {args.workload}")
    print("\ninclusive share (the function and what it calls):")
    for name, count in inclusive.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\nself share (the function's own code):")
    for name, count in own.most_common(args.top // 2):
        print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
