"""``python -m benchmarks.report``: measure (or ``--render-only``), then write the page and plots.

python -m benchmarks.report                # full run -> docs/benchmarks.md, docs/benchmarks/
python -m benchmarks.report --quick        # -> benchmarks/results/quick/ (not for committing)
python -m benchmarks.report --render-only  # the page and plots again from the JSON
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.load import use_uvloop
from benchmarks.report import page, plots, schema
from benchmarks.report.measure import console
from benchmarks.report.plan import FULL, QUICK
from benchmarks.report.run import run
from embedpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "docs" / "benchmarks.md"  # its hand-written parts frame every rendering
QUICK_OUT = ROOT / "benchmarks" / "results" / "quick"
README = ROOT / "README.md"


def write(report: schema.Report, out: Path) -> None:
    """``out``/benchmarks.md (the template with its generated part replaced) and the plots."""
    images = out / page.IMAGES
    plots.draw_all(report, images)
    target = out / "benchmarks.md"
    template = target if target.exists() else TEMPLATE
    target.write_text(page.splice(template.read_text(), page.render(report)))
    console.print(f"wrote {target} and {len(plots.PLOTS)} plots under {images}")
    if out.resolve() == TEMPLATE.parent:  # the published page: the README shows its plots
        README.write_text(page.splice(README.read_text(), page.readme_block(report)))
        console.print(f"wrote the plots into {README}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds a point")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where benchmarks.md and benchmarks/ go (docs/, or benchmarks/results/quick/)",
    )
    parser.add_argument("--render-only", action="store_true", help="from the JSON, no run")
    parser.add_argument(
        "--max-clients",
        type=int,
        default=None,
        help="leave out concurrency points above this (the batch points at 64 and 128 clients "
        "take most of a full run on a slow machine)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the ONNX exports live and are kept"
    )
    args = parser.parse_args()
    out: Path = args.out or (QUICK_OUT if args.quick else ROOT / "docs")
    results = out / page.IMAGES / "report.json"
    if not args.render_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        use_uvloop()
        exports: Path = args.data_dir or Settings().data_dir
        plan = QUICK if args.quick else FULL
        if args.max_clients:
            plan = plan.up_to(args.max_clients)
        report = run(plan, ROOT, exports, ROOT / "benchmarks" / "results" / "logs")
        schema.save(report, results)
        console.print(f"wrote {results}")
    write(schema.load(results), out)


if __name__ == "__main__":
    main()
