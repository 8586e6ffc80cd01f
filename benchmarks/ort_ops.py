"""Where an ONNX export's time goes on this CPU, by operator type: the fp32 export against the
served int8 one, on the micro-batcher's batches, from ONNX Runtime's own profiler.

    python -m benchmarks.ort_ops            # exports under EMBEDPIPE_DATA_DIR/onnx, made if missing

int8's speed over fp32 rests on its integer MatMuls; on a CPU without VNNI (AVX2) they take
three instructions where VNNI takes one, and the activations' quantisation is paid on every
call. This prints each operator type's share of the kernel time, so the page can say which.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.table import Table

from benchmarks.backends import _load, console, token_budget_batches
from benchmarks.corpus import load_corpus
from benchmarks.report.environment import vector_instructions
from embedpipe.embedders import configure_threads
from embedpipe.embedders.model_files import ModelFiles, read_model_files
from embedpipe.embedders.onnx_export import MODEL_FILE, export_id, read_metadata
from embedpipe.embedders.onnx_runner import features, session_options
from embedpipe.settings import BatchingSettings, Settings


def profile_export(
    model: Path, inputs: list[str], batches: list[list[str]], threads: int, files: ModelFiles
) -> tuple[float, Counter[str]]:
    """(texts/s with the profiler on, microseconds per operator type) over ``batches``."""
    import onnxruntime

    options = session_options(threads, spin=False)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "ort")
        session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        tokenizer = files.tokenizer()
        feeds = [
            {
                name: value
                for name, value in features(tokenizer, files, inputs, batch).items()
                if name in inputs
            }
            for batch in batches
        ]
        started = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        seconds = time.perf_counter() - started
        events = json.loads(Path(session.end_profiling()).read_text())
    by_type: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
    return sum(map(len, batches)) / seconds, by_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--top", type=int, default=8, help="operator types per export")
    parser.add_argument("--data-dir", type=Path, default=None, help="where exports live")
    args = parser.parse_args()
    data_dir: Path = args.data_dir or Settings().data_dir
    cores = configure_threads(0)
    fp32 = _load(data_dir, "onnx", cores)
    _load(data_dir, "onnx", cores, quantize="int8")  # makes the int8 export if missing
    model_dir = Path(fp32.info.source)
    stem = export_id(model_dir, fp32.info.weights_sha256 or "")
    files = read_model_files(model_dir)
    batches = token_budget_batches(
        fp32, load_corpus(args.texts), BatchingSettings().max_batch_tokens
    )
    console.print(
        f"{args.texts} texts in {len(batches)} batches, {cores} threads, "
        f"CPU: {vector_instructions()}"
    )
    table = Table(title="kernel time by operator type (ONNX Runtime's profiler)")
    for column in ("export", "texts/s (profiled)", "operator", "share", "seconds"):
        table.add_column(column, justify="left" if column in ("export", "operator") else "right")
    for kind in ("fp32", "int8"):
        export_dir = data_dir / "onnx" / f"{stem}-{kind}"
        inputs = read_metadata(export_dir)["inputs"]
        rate, by_type = profile_export(export_dir / MODEL_FILE, inputs, batches, cores, files)
        total = sum(by_type.values())
        for index, (name, micros) in enumerate(by_type.most_common(args.top)):
            table.add_row(
                kind if index == 0 else "",
                f"{rate:.1f}" if index == 0 else "",
                name,
                f"{micros / total:.1%}",
                f"{micros / 1e6:.2f}",
            )
        table.add_row("", "", "all", "100%", f"{total / 1e6:.2f}", end_section=True)
    console.print(table)


if __name__ == "__main__":
    main()
