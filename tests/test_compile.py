"""`--compile`: torch.compile in one process and DeepSpeed's engine.compile, same steps as the eager run.

Inductor compiles on CPU too (tens of seconds for the tiny model), so the suite runs the real thing: the
compiled runs must finish, take the same steps as an eager run on the same data (losses within float
tolerance), and write checkpoints and a best model whose tensor names are the model's own, loadable by
`dist-train eval` (torch.compile would otherwise prefix them with `_orig_mod.`).
"""

from __future__ import annotations

import pytest
from conftest import FAST_TRAIN_FLAGS, TrainRun, scalars
from safetensors.torch import load_file

from dist_train import cli
from dist_train import config as config_mod
from dist_train.checkpoint import CONSOLIDATED
from dist_train.metrics import TRAIN_TAGS
from dist_train.model import build_model

STEPS = 4


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory) -> dict[str, TrainRun]:
    tmp = tmp_path_factory.mktemp("compile")
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), "--max_steps", str(STEPS), "--log_every_steps", "1"]
    flags += ["--precision", "fp32", "--dropout", "0"]
    deepspeed = ["--use_deepspeed", "--deepspeed_config_file", "configs/deepspeed/zero2-fp32.json"]
    started = {
        "eager": TrainRun(tmp, "eager", flags),
        "compiled": TrainRun(tmp, "compiled", [*flags, "--compile", "true"]),
        "zero2_compiled": TrainRun(tmp, "zero2_compiled", [*flags, "--compile", "true"], [*deepspeed, "--num_processes", "1"]),
    }  # fmt: skip
    yield started
    for run in started.values():
        run.kill()


@pytest.mark.parametrize("name", ["compiled", "zero2_compiled"])
def test_compiled_runs_take_the_eager_steps_and_write_plain_checkpoints(runs, name, demo_shards, tmp_path):
    rc, log = runs[name].finish()
    assert rc == 0, log[-4000:]
    assert f"finished at step {STEPS}" in log
    rc, eager_log = runs["eager"].finish()
    assert rc == 0, eager_log[-3000:]
    got, want = scalars(runs[name].run_dir, TRAIN_TAGS["loss"]), scalars(runs["eager"].run_dir, TRAIN_TAGS["loss"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], rel=1e-4)
    best = runs[name].run_dir / "best" / CONSOLIDATED
    cfg = config_mod.load_run_config(runs[name].run_dir)
    assert set(load_file(str(best))) == set(build_model(cfg.model).state_dict()), "no _orig_mod. prefix"
    assert (
        cli.main(["eval", "--checkpoint", str(best), "--shards", str(demo_shards), "--json", str(tmp_path / "m.json")])
        == 0
    )
