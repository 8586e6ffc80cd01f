"""int8 recipes side by side: speed against torch and fidelity to torch on a held corpus (texts
the static recipes were not calibrated on), each recipe quantised from the same fp32 export.

    make bench-int8          # or: python -m benchmarks.int8 --texts 512 --rounds 2

Every batch runs on every contender in turn, the order rotating (as make bench-backends
does), so a burst of load on the shared machine slows all of them alike. The recipes are
``embedpipe.embedders.onnx_int8.Int8Recipe``s; the served one is ``INT8_RECIPE``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.table import Table

from benchmarks.backends import Contender, _load, console, cosines, race, token_budget_batches
from benchmarks.corpus import load_corpus
from embedpipe.embedders import configure_threads
from embedpipe.embedders.calibration import calibration_texts
from embedpipe.embedders.model_files import read_model_files
from embedpipe.embedders.onnx_export import MODEL_FILE, export_id, read_metadata
from embedpipe.embedders.onnx_int8 import (
    INT8_GATE,
    INT8_RECIPE,
    Int8Recipe,
    neighbour_agreement,
    quantize_model,
)
from embedpipe.embedders.onnx_runner import OnnxRunner
from embedpipe.settings import BatchingSettings, Settings

FFN_OUT = "/output/dense/"  # the FFN's output projection (GELU's activations in)
ATTENTION_OUT = "/attention/output/dense/"
RECIPES = (
    Int8Recipe("dynamic, per tensor", per_channel=False, embeddings=True),
    Int8Recipe("dynamic, per channel, embeddings too", embeddings=True),
    Int8Recipe("dynamic, per channel"),
    Int8Recipe("dynamic, FFN out fp32", keep_fp32=(FFN_OUT,)),
    Int8Recipe("dynamic, attention out fp32", keep_fp32=(ATTENTION_OUT,)),
    Int8Recipe("dynamic, first + last layer fp32", keep_fp32=("layer.0/", "layer.5/")),
    Int8Recipe("static (calibrated), per channel", kind="static"),
    Int8Recipe("static (calibrated), FFN out fp32", kind="static", keep_fp32=(FFN_OUT,)),
    Int8Recipe("dynamic, smoothed (alpha 0.8)", smooth=0.8),
    Int8Recipe("dynamic, smoothed (alpha 0.8), FFN out fp32", smooth=0.8, keep_fp32=(FFN_OUT,)),
    Int8Recipe(
        "dynamic, smoothed (alpha 0.8), FFN out fp32, uint8 weights",
        smooth=0.8,
        keep_fp32=(FFN_OUT,),
        weights="uint8",
    ),
    Int8Recipe("dynamic, smoothed (alpha 0.8), uint8 weights", smooth=0.8, weights="uint8"),
    # "/output/dense/" (FFN_OUT) also matches the attention's output projection: this keeps
    # only the FFN's six output projections fp32 (all-MiniLM-L6-v2's layers).
    Int8Recipe(
        "dynamic, smoothed (alpha 0.8), only FFN out fp32, uint8 weights",
        smooth=0.8,
        keep_fp32=tuple(f"layer.{n}{FFN_OUT}" for n in range(6)),
        weights="uint8",
    ),
    Int8Recipe("blockwise 32", kind="blockwise", block_size=32),
    Int8Recipe("blockwise 64", kind="blockwise", block_size=64),
    Int8Recipe("blockwise 128", kind="blockwise", block_size=128),
    Int8Recipe("blockwise 32, fp32 products", kind="blockwise", accuracy_level=0),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512, help="held corpus size")
    parser.add_argument("--rounds", type=int, default=2, help="times each batch runs")
    parser.add_argument("--only", default="", help="comma-separated recipe numbers (1-based)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where exports live")
    args = parser.parse_args()
    data_dir: Path = args.data_dir or Settings().data_dir
    cores = configure_threads(0)
    calibrated = set(calibration_texts())
    texts = [text for text in load_corpus(args.texts + 64) if text not in calibrated]
    texts = texts[: args.texts]
    recipes = [
        recipe
        for number, recipe in enumerate(RECIPES, start=1)
        if not args.only or str(number) in args.only.split(",")
    ]

    torch_model = _load(data_dir, "torch", cores)
    fp32 = _load(data_dir, "onnx", cores)
    model_dir = Path(fp32.info.source)
    export_dir = data_dir / "onnx" / f"{export_id(model_dir, fp32.info.weights_sha256 or '')}-fp32"
    files = read_model_files(model_dir)
    inputs = read_metadata(export_dir)["inputs"]
    contenders = [Contender("torch", torch_model, cores), Contender("onnx fp32", fp32, cores)]
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in recipes:
            target = Path(scratch) / f"{len(contenders)}.onnx"
            quantize_model(export_dir / MODEL_FILE, target, recipe, files, inputs)
            runner = OnnxRunner(target, files, inputs, threads=cores)
            runner.embed(["warm up the model", "a second text"])
            contenders.append(Contender(recipe.name, runner, cores))
        budget = BatchingSettings().max_batch_tokens
        batches = token_budget_batches(torch_model, texts, budget)
        console.print(
            f"{len(texts)} held texts in {len(batches)} batches (<= {budget:,} padded tokens), "
            f"{args.rounds} rounds, {cores} threads; served recipe: {INT8_RECIPE.name}; gate: "
            f"min cosine >= {INT8_GATE.min_cosine}, top-10 >= {INT8_GATE.top10}"
        )
        race(contenders, batches, args.rounds)
    console.print(_table(contenders))


def _table(contenders: list[Contender]) -> Table:
    reference = contenders[0]
    want = reference.all_vectors()
    table = Table("recipe", "x torch", "best x torch", "cos mean", "cos min", "top-10", "gate")
    for contender in contenders:
        got = contender.all_vectors()
        similarity = cosines(got, want)
        top10 = neighbour_agreement(got, want)
        passes = similarity.min() >= INT8_GATE.min_cosine and top10 >= INT8_GATE.top10
        table.add_row(
            contender.label,
            f"{contender.rate / reference.rate:.2f}",
            f"{contender.best_rate / reference.best_rate:.2f}",
            f"{similarity.mean():.5f}",
            f"{similarity.min():.4f}",
            f"{top10:.3f}",
            "pass" if passes else "fail",
        )
    return table


if __name__ == "__main__":
    main()
