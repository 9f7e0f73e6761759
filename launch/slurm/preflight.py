"""Checks a SLURM job's settings before any training process starts; prints the run directory.

The job scripts run it on the batch node so that a missing config file, a bad
flag, a missing DeepSpeed JSON or an unreadable shard set ends
the job at once with a message, instead of as a traceback per rank after the
allocation has been spent starting processes. The trainer's own config code
does the checking, so the rules live in one place.

    python -m launch.slurm.preflight ACCELERATE_YAML WORLD_SIZE [trainer flags...]   (from the repository root)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dist_train import cli
from dist_train import config as config_mod
from dist_train.config import ConfigError
from dist_train.data.shards import ShardSetError
from dist_train.plan import open_shard_sets

ACCELERATE_DIR = Path("launch/accelerate")


def check_accelerate_config(path: str) -> None:
    """The accelerate YAML exists, parses, and the DeepSpeed JSON it names exists."""
    known = sorted(str(p) for p in ACCELERATE_DIR.glob("**/*.yaml"))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"accelerate config {path!r} does not exist (relative paths start at {Path.cwd()}); "
            f"set DIST_TRAIN_ACCELERATE_CONFIG to an existing file, e.g. one of {known}"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"accelerate config {path!r} is not valid YAML ({e})") from e
    ds_file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not Path(ds_file).is_file():
        raise ConfigError(
            f"accelerate config {path!r} names deepspeed_config_file {ds_file!r}, which does not exist; "
            f"fix the path (one of {sorted(str(q) for q in Path('configs/deepspeed').glob('*.json'))})"
        )


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[1].isdigit():
        print("usage: python -m launch.slurm.preflight ACCELERATE_YAML WORLD_SIZE [trainer flags...]", file=sys.stderr)
        return 2
    accelerate_yaml, world_size, trainer_flags = argv[0], int(argv[1]), argv[2:]
    parser = argparse.ArgumentParser(prog="dist-train job (trainer flags)")
    config_mod.add_arguments(parser)
    try:
        check_accelerate_config(accelerate_yaml)
        args, unknown = parser.parse_known_args(cli.spelled_as_parser(parser, trainer_flags))
        if unknown:
            raise ConfigError(f"unknown trainer arguments {unknown}; see `dist-train train --help`")
        cfg = config_mod.from_args(args)
        open_shard_sets(cfg, world_size)  # the data check: every split the run reads, for its processes
    except (ConfigError, ShardSetError) as e:
        print(f"dist-train job: error: {e}", file=sys.stderr)
        return 2
    print(Path(cfg.train.output_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
