"""`dist-train extract`'s arguments and main: every check that needs no model runs before the models load."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from dist_train import cli
from dist_train.data.shards import INDEX_NAME
from dist_train.extract import pairing
from dist_train.extract.cache import check_cache_settings, scan_cache
from dist_train.extract.job import ExtractError, Job, Settings
from dist_train.extract.models import choose_providers, load_pack
from dist_train.extract.sources import discover, header_pixel_limit
from dist_train.extract.stage1 import run_stage1
from dist_train.extract.stage2 import REPORT_NAME, run_stage2


def add_face_arguments(group, unit: str) -> None:
    """The image size limit, detection and face filters: the same flags, defaults and checks for extract and
    frontalize."""
    limit = Settings.max_pixels
    group.add_argument(
        "--max-pixels",
        type=int,
        default=limit,
        help=f"images over this many pixels (width x height, read from the header) are counted as too_large and "
        f"never decoded (default {limit})",
    )
    group.add_argument("--det-size", type=int, default=640, help="detector input size in pixels (default 640)")
    group.add_argument(
        "--det-thresh", type=float, default=0.3, help="detector threshold; faces below are not seen (default 0.3)"
    )
    group.add_argument(
        "--min-score", type=float, default=0.5, help="drop faces scoring lower, counted as low_score (default 0.5)"
    )
    group.add_argument(
        "--min-size",
        type=float,
        default=40.0,
        help="drop faces whose box is smaller on its shorter side, pixels (default 40)",
    )
    group.add_argument(
        "--keep", choices=pairing.KEEP_POLICIES, default="largest", help=f"faces kept per {unit} (default largest)"
    )


def check_face_arguments(args) -> None:
    if args.min_score < args.det_thresh:
        raise ExtractError(
            f"--min-score {args.min_score} is below --det-thresh {args.det_thresh}; faces under it are never seen"
        )
    if args.det_size < 32:
        raise ExtractError(f"--det-size {args.det_size}: must be >= 32")
    limit = header_pixel_limit()
    if args.max_pixels < 1 or limit is not None and args.max_pixels > limit:
        raise ExtractError(
            f"--max-pixels {args.max_pixels}: must be >= 1 and at most {limit}, the largest image whose header "
            "Pillow reads (it treats larger ones as decompression bombs)"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-train extract",
        description="Run an InsightFace model pack over ROOT/<identity>/** images and videos and write a shard set "
        "of profile->frontal pairs. Resumable: rerun the same command after an interruption.",
    )
    p.add_argument("root", help="input tree: ROOT/<identity>/**/*.jpg|png|... and ROOT/<identity>/*.mp4|avi|...")
    p.add_argument(
        "--pack",
        required=True,
        help="model pack directory in the buffalo_l layout (det_10g.onnx, w600k_r50.onnx, 1k3d68.onnx)",
    )
    p.add_argument("--out", required=True, help="output shard set directory (holds the resumable cache in OUT/.cache)")
    g = p.add_argument_group("inputs")
    g.add_argument("--aligned", action="store_true", help="inputs are 112x112 ArcFace-aligned crops: no detection")
    sampling = g.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int, help="video: take every k-th frame")
    sampling.add_argument("--fps", type=float, help="video: take this many frames per second (default 2)")
    add_face_arguments(p.add_argument_group("detection and filters"), unit="image/frame")
    g = p.add_argument_group("pairing and splits")
    g.add_argument("--frontal-yaw", type=float, default=20.0, help="|yaw| <= this is frontal (default 20)")
    g.add_argument("--profile-yaw", type=float, default=45.0, help="|yaw| >= this is profile (default 45)")
    g.add_argument("--max-pairs-per-identity", type=int, help="cap on profile faces used per identity")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of identities in val (default 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.0, help="share of identities in test (default 0)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers", type=int, default=1, help="processes, each with its own onnxruntime sessions (default 1)"
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="faces per recognition batch; images per task (default 32)"
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when onnxruntime has it"
    )
    g.add_argument("--fresh", action="store_true", help="discard OUT/.cache and extract everything again")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args, root: Path, out: Path) -> None:
    if not root.is_dir():
        raise ExtractError(f"input root {str(root)!r} is not a directory")
    if out.resolve().is_relative_to(root.resolve()):
        raise ExtractError(f"--out {str(out)!r} is inside the input root {str(root)!r}; put it elsewhere")
    check_face_arguments(args)
    if args.every is not None and args.every < 1 or args.fps is not None and args.fps <= 0:
        raise ExtractError("--every needs an integer >= 1 and --fps a positive number")
    if args.workers < 1 or args.batch_size < 1:
        raise ExtractError("--workers and --batch-size must be >= 1")


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    root, out = Path(args.root), Path(args.out)
    try:
        _check_args(args, root, out)
        job = Job(
            root=root,
            out=out,
            settings=Settings(
                pack=args.pack,
                aligned=args.aligned,
                det_size=args.det_size,
                det_thresh=args.det_thresh,
                every=args.every,
                fps=None if args.every else (args.fps or 2.0),
                max_pixels=args.max_pixels,
            ),
            face_filter=pairing.FaceFilter(min_size=args.min_size, min_score=args.min_score, keep=args.keep),
            rules=pairing.PairingRules(
                frontal_yaw=args.frontal_yaw,
                profile_yaw=args.profile_yaw,
                max_pairs_per_identity=args.max_pairs_per_identity,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
            ),
            providers=tuple(choose_providers(args.device)),
            workers=args.workers,
            batch_size=args.batch_size,
        )
        job.rules.check()
        inputs, names, problems = discover(root, args.aligned)
        pack = load_pack(args.pack, list(job.providers))  # fails here, before any work, when the pack is incomplete
        out.mkdir(parents=True, exist_ok=True)
        check_cache_settings(out, job.settings, args.fresh)
        done = scan_cache(out, root, inputs)
        todo = [i for i in inputs if i.rel not in done]
        reused = len(inputs) - len(todo)
        print(
            f"dist-train extract: {len(inputs)} inputs in {len(names)} identity folders, {reused} already extracted; "
            f"models {pack.files} on {job.providers[0]}",
            file=sys.stderr,
        )
        (out / INDEX_NAME).unlink(missing_ok=True)  # the set is incomplete until stage 2 rewrites it
        with tqdm(total=len(inputs), initial=reused, unit="file", desc="extract", disable=args.no_progress) as bar:
            run_stage1(job, todo, pack, bar)
        report = run_stage2(job, inputs, names, problems, pack.files, reused)
    except ValueError as e:  # ExtractError, and the rule checks of pairing
        print(f"dist-train extract: error: {e}", file=sys.stderr)
        return 1
    s = report["summary"]
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "none"
    print(
        f"dist-train extract: {s['pairs']} pairs from {s['identities_with_pairs']} identities "
        f"({s['faces_kept']} of {s['faces_detected']} faces kept: {s['frontal_faces']} frontal, "
        f"{s['profile_faces']} profile); splits {report['splits']}\n"
        f"dropped: {dropped}\nwrote {out / INDEX_NAME}; per-input problems in {out / REPORT_NAME}"
    )
    return 0
