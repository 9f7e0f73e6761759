"""`dist-train report RUN_DIR...`: arguments, then read, diagnose, plot and write the report."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dist_train import cli
from dist_train.plots import write_plots
from dist_train.report.diagnoses import diagnose
from dist_train.report.render import render_markdown, render_text
from dist_train.report.run import ReportError, load_run, unique_names
from dist_train.report.shardset import attach_data
from dist_train.report.summary import summarize
from dist_train.report.thresholds import LOW_RATIO, MIN_GAIN, OVERFIT_RATIO, PLATEAU_DELTA, PLATEAU_EPOCHS, Thresholds


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-train report",
        description="Read the TensorBoard curves of one or more runs, plot them and diagnose what to change next.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir of a `dist-train train` run")
    p.add_argument(
        "--out", default=None, help="folder for report.md and the plots (default RUN_DIR/report, or ./report)"
    )
    p.add_argument("--json", action="store_true", help="print the summaries and findings as JSON instead of text")
    p.add_argument("--plateau_epochs", type=float, default=PLATEAU_EPOCHS, help="W: epochs without progress")
    p.add_argument("--plateau_delta", type=float, default=PLATEAU_DELTA, help="val cos gain that counts as progress")
    p.add_argument("--min_gain", type=float, default=MIN_GAIN, help="least val cos gain over the identity baseline")
    p.add_argument(
        "--overfit_ratio", type=float, default=OVERFIT_RATIO, help="val/train loss ratio that is overfitting"
    )
    p.add_argument("--low_ratio", type=float, default=LOW_RATIO, help="val/train ratio below which to regularise less")
    p.add_argument(
        "--data",
        choices=("run", "cached", "off"),
        default="run",
        help="the shard set's data ceiling and linear probe: compute what is not cached (run, default), only read "
        "the probe's cache (cached; the ceiling is always computed), or neither (off)",
    )
    return cli.parse_args(p, argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    th = Thresholds(args.plateau_epochs, args.plateau_delta, args.min_gain, args.overfit_ratio, args.low_ratio)
    try:
        runs = [load_run(d) for d in args.runs]
    except ReportError as e:
        print(f"dist-train report: error: {e}", file=sys.stderr)
        return 2
    unique_names(runs)
    for r in runs:
        attach_data(r, args.data)
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out, th)
    results = [
        {"run": r.name, "path": str(r.path), "summary": summarize(r), "findings": [asdict(f) for f in diagnose(r, th)]}
        for r in runs
    ]
    report = out / "report.md"
    report.write_text(render_markdown(results, plots, th))
    payload = {"runs": results, "report": str(report), "plots": [str(p) for p in plots]}
    (out / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(render_text(results, report, plots))
    return 0
