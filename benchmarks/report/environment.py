"""The machine, the date and the versions that the page states."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.report.schema import Machine
from embedpipe.embedders.registry import available_cores

CODE = ("src", "benchmarks", "pyproject.toml", "constraints.txt")
PACKAGES = ("torch", "onnxruntime", "sentence-transformers", "transformers", "uvicorn", "fastapi")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ("" when absent)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or "unknown CPU"


def vector_instructions() -> str:
    """The widest vector and int8 dot-product instructions the CPU offers: int8's speed-up
    over fp32 depends on them (VNNI does in one instruction what AVX2 does in three)."""
    flags = set(cpuinfo("flags").split())
    widest = next(
        (name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags),
        "no AVX2",
    )
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return f"{widest}, {'with' if vnni else 'no'} VNNI"


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine_at_start() -> Machine:
    """The machine as the run starts; ``load_end`` and ``finished`` are set when it ends."""
    return Machine(
        cpu=cpu_model(),
        instructions=vector_instructions(),
        cores=available_cores(),
        memory_gib=round(memory_gib(), 1),
        kernel=platform.release(),
        load_start=load_average(),
        load_end=[],
        started=now(),
        finished="",
    )


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_revision(root: Path) -> str:
    """embedpipe's commit, marked ``-dirty`` when the code measured differs from it (the
    pages a run writes do not count)."""
    try:
        sha = _git(root, "rev-parse", "--short=12", "HEAD")
        changed = _git(root, "status", "--porcelain", "--", *CODE)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if changed else sha


def versions(root: Path, infinity: str | None) -> dict[str, str]:
    found = {"python": platform.python_version(), "embedpipe": git_revision(root)}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["infinity-emb"] = infinity or "not measured"
    return found
