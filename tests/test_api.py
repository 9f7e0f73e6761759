"""The Python API a README example promises, and the tracker API the trainer logs through.

Run in a fresh process: Accelerate keeps one accelerator state per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, RUN_ENV, RUN_TIMEOUT_S

from dist_train import config as config_mod
from dist_train.config import ConfigError

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from accelerate.tracking import GeneralTracker
    from dist_train import Config, Frontalizer, train
    from dist_train.data.blocks import read_split
    from dist_train.data.shards import ShardSet

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.config = {}, None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            for tag, value in values.items():
                self.logged.setdefault(tag, {})[step] = value

    data, out = sys.argv[1], sys.argv[2]
    recorder = Recorder()
    cfg = Config.from_preset(
        "debug-cpu", data_dir=data, output_dir=out, max_steps=20, num_workers=0, eval_every_steps=10, log_every_steps=5
    )
    rc = train(cfg, trackers=(recorder,))
    model = Frontalizer.load(f"{out}/best/model.safetensors")
    val = read_split(ShardSet.open(data), "val")
    frontal = model.frontalize(val["src_emb"][:64], val["src_kps"][:64], val["src_pose"][:64])
    print("RESULT", json.dumps({
        "rc": rc,
        "train_loss_steps": sorted(recorder.logged.get("train/loss", {})),
        "val_cos_steps": sorted(recorder.logged.get("val/mean_cos", {})),
        "config_max_steps": (recorder.config or {}).get("train.max_steps"),
        "shape": list(frontal.shape),
        "norm": float(np.abs(np.linalg.norm(frontal, axis=1) - 1).max()),
        "moved": float(np.abs(frontal - val["src_emb"][:64]).max()),
    }))
    """
)


def test_python_api_trains_loads_and_frontalizes_and_every_tracker_gets_the_logs(demo_shards, tmp_path):
    script = tmp_path / "api.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(demo_shards), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO, env={**os.environ, **RUN_ENV},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert result["rc"] == 0
    assert result["train_loss_steps"] == [5, 10, 15, 20], "the custom tracker receives what TensorBoard does"
    assert result["val_cos_steps"] == [10, 18, 20]  # every 10 steps and at the epoch end (18 steps)
    assert result["config_max_steps"] == 20, "and the run's settings"
    assert result["shape"] == [64, 512] and result["norm"] < 1e-5 and result["moved"] > 0
    assert (tmp_path / "run" / "tb").is_dir(), "TensorBoard is always one of the trackers (report reads it)"


@pytest.mark.parametrize(
    "log_with, message",
    [
        ("wandb", "including tensorboard"),
        ("tensorboard,neptune", "including tensorboard"),
    ],
)
def test_log_with_names_known_trackers_and_always_tensorboard(log_with, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.build({"log_with": log_with})


def test_a_tracker_that_is_not_installed_is_refused_naming_the_package():
    from dist_train.runtime import trackers

    cfg = config_mod.build({"log_with": "tensorboard,comet_ml"})
    with pytest.raises(ConfigError, match=r"log_with: \['comet_ml'\] not installed here .*`pip install comet-ml`"):
        trackers(cfg)
