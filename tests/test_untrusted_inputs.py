"""Files a user is handed cannot steer the process, and every refusal is one line.

Hostile files are crafted from a real 2-step run's outputs: safetensors whose config metadata holds keys that
are no setting (``__class__``) or asks for a model the file's tensors are not (d_model 65536 x 64 layers), a
pickle named ``.safetensors``, YAML with a ``!!python`` tag (in ``--config`` and in a checkpoint), a garbage
``trainer_state.json``, a checkpoint of one launcher resumed under the other (DDP <-> DeepSpeed) and resumes or
exports with other shapes. The real commands (`dist-train eval / export / train --resume`, `accelerate launch`)
must exit 2 with one line on stderr naming the file or key and the fix, and no traceback; `Frontalizer.load`
must raise the same error and leave `Config`'s class untouched. The independent command runs go at once, a few
in parallel, in one module fixture.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN_FLAGS, REPO, RUN_ENV, RUN_TIMEOUT_S, free_port
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_train import config as config_mod
from dist_train.checkpoint import STATE_FILE, complete_checkpoints, read_state
from dist_train.config import Config, ConfigError, ModelConfig
from dist_train.frontalize import Frontalizer
from dist_train.rundir import BEST, CONFIG, CONSOLIDATED

MEMORY_CAP = 16 << 30  # address space of the processes handed a huge model: 51 GB cannot be allocated
HUGE = {"d_model": 65536, "num_layers": 64, "dim_feedforward": 65536, "nhead": 8}


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run(args: list[str], launch: list[str] | None = None, cap: bool = False) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "dist_train"]
    if launch is not None:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port"]
        prefix += [str(free_port()), "-m", "dist_train"]
    started = time.monotonic()
    proc = subprocess.run(
        [*prefix, *args],
        cwd=REPO,
        env=os.environ | RUN_ENV,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        preexec_fn=_cap_memory if cap else None,
    )
    proc.seconds = time.monotonic() - started
    return proc


def one_line_refusal(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """The refusal's one stderr line, after checking exit 2, no traceback and that it names ``fragments``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dist-train {command}: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def model_file(path: Path, tensors: dict, config: dict) -> Path:
    save_file(tensors, str(path), metadata={"config": json.dumps(config), "meta": "{}"})
    return path


class MakesDirectory:
    """Unpickling this creates a directory: the sign that a file was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def hostile(demo_shards, tmp_path_factory) -> dict:
    """A 2-step single-process run, the hostile files made from it, and every command run on them."""
    tmp = tmp_path_factory.mktemp("untrusted")
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), "--eval_every_steps", "2"]
    source = tmp / "source"
    made = run(["train", *flags, "--max_steps", "2", "--output_dir", str(source)])
    assert made.returncode == 0, made.stderr[-3000:]
    checkpoint = complete_checkpoints(source)[-1]
    best = source / BEST / CONSOLIDATED
    tensors, config = load_file(str(best)), stored_config(best)
    files = {"tmp": tmp, "checkpoint": checkpoint, "best": best, "marker": tmp / "code-ran"}
    files["class"] = model_file(tmp / "class.safetensors", tensors, {"__class__": {"to_dict": "x"}})
    files["section"] = model_file(tmp / "section.safetensors", tensors, config | {"model": {"validate": "x"}})
    files["huge"] = model_file(tmp / "huge.safetensors", tensors, config | {"model": config["model"] | HUGE})
    files["wide"] = model_file(tmp / "wide.safetensors", tensors, config | {"model": config["model"] | {"d_model": 64}})
    files["pickle"] = tmp / "pickle.safetensors"
    torch.save({"w": MakesDirectory(files["marker"])}, files["pickle"])
    tag = f'model: !!python/object/apply:os.mkdir ["{files["marker"]}"]\n'
    (tmp / "tag.yaml").write_text(tag)
    tagged = tmp / "tagged" / checkpoint.name
    shutil.copytree(checkpoint, tagged)
    (tagged / CONFIG).write_text(tag)
    garbage = tmp / "garbage"
    shutil.copytree(source, garbage)
    (complete_checkpoints(garbage)[-1] / STATE_FILE).write_text('{"step": "twelve"}')

    resume = ["train", *flags, "--max_steps", "4"]
    deepspeed = ["--use_deepspeed", "--deepspeed_config_file", "configs/deepspeed/zero2-fp32.json"]
    commands = {
        "eval_class": (["eval", "--checkpoint", str(files["class"]), "--shards", str(demo_shards)], None, False),
        "export_huge": (["export", "--checkpoint", str(files["huge"]), "--out", str(tmp / "x1")], None, True),
        "eval_huge": (["eval", "--checkpoint", str(files["huge"]), "--shards", str(demo_shards)], None, True),
        "export_wide": (["export", "--checkpoint", str(files["wide"]), "--out", str(tmp / "x2")], None, False),
        "eval_pickle": (["eval", "--checkpoint", str(files["pickle"]), "--shards", str(demo_shards)], None, False),
        "train_tag": (["train", "--config", str(tmp / "tag.yaml"), "--data_dir", str(demo_shards)], None, False),
        "eval_tagged": (["eval", "--checkpoint", str(tagged), "--shards", str(demo_shards)], None, False),
        "resume_garbage": ([*resume, "--output_dir", str(garbage), "--resume", "latest"], None, False),
        "resume_wide": (
            [*resume, "--d_model", "64", "--output_dir", str(tmp / "r1"), "--resume", str(checkpoint)],
            None,
            False,
        ),
        "lr_inf": ([*resume, "--lr", "inf", "--output_dir", str(tmp / "r2")], None, False),
        "ddp_under_deepspeed": (
            [*resume, "--precision", "fp32", "--output_dir", str(tmp / "r3"), "--resume", str(checkpoint)],
            [*deepspeed, "--num_processes", "1"],
            False,
        ),
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run, *command) for name, command in commands.items()}
        files["runs"] = {name: f.result() for name, f in futures.items()}
    return files


def stored_config(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])


# ---- configs stored in files: known sections and fields only ------------------------------------------------


def test_a_stored_config_with_keys_that_are_no_setting_is_refused_and_config_stays_intact(hostile):
    one_line_refusal(hostile["runs"]["eval_class"], "eval", str(hostile["class"]), "unknown key '__class__'")
    before = dict(vars(Config))
    for name, key in (("class", "'__class__'"), ("section", "model.validate")):
        with pytest.raises(ConfigError, match=f"unknown key {key}"):
            Frontalizer.load(hostile[name])
    assert dict(vars(Config)) == before and Config.to_dict is before["to_dict"]
    assert Config().to_dict()["model"]["d_model"] == ModelConfig().d_model
    assert "validate" not in vars(ModelConfig()) and callable(ModelConfig.validate)


def test_a_config_asking_for_a_model_its_tensors_are_not_is_refused_before_anything_is_built(hostile):
    """51 GB are asked for; the processes may allocate 16 GB and are refused within seconds, naming the mismatch."""
    for command in ("export", "eval"):
        proc = hostile["runs"][f"{command}_huge"]
        one_line_refusal(proc, command, str(hostile["huge"]), "d_model 65536, 64 layers", "tensors", "refusing")
    one_line_refusal(hostile["runs"]["export_wide"], "export", str(hostile["wide"]), "d_model 64", "different shape")
    assert not (hostile["tmp"] / "x1").exists() and not (hostile["tmp"] / "x2").exists()
    started = time.monotonic()
    with pytest.raises(ConfigError, match="d_model 65536, 64 layers"):
        Frontalizer.load(hostile["huge"])
    assert time.monotonic() - started < 10
    # one layer of that width passes the tensor-count bound; the size bound refuses it without building it
    config = stored_config(hostile["best"])
    wide = config | {"model": config["model"] | HUGE | {"num_layers": 1}}
    path = model_file(hostile["tmp"] / "one-huge-layer.safetensors", load_file(str(hostile["best"])), wide)
    with pytest.raises(ConfigError, match=r"parameters, over the bound of"):
        Frontalizer.load(path)
    assert Frontalizer.load(hostile["best"]).backend == "torch"  # the run's own file still loads


def test_a_pickle_named_safetensors_is_refused_without_being_unpickled(hostile):
    one_line_refusal(hostile["runs"]["eval_pickle"], "eval", str(hostile["pickle"]), "not a readable safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        Frontalizer.load(hostile["pickle"])
    assert not hostile["marker"].exists()


def test_a_yaml_python_tag_is_refused_in_a_config_file_and_in_a_checkpoint(hostile):
    for name, command in (("train_tag", "train"), ("eval_tagged", "eval")):
        line = one_line_refusal(hostile["runs"][name], command, "not a plain YAML config", "python/object/apply")
        assert "tag.yaml" in line or f"{CONFIG}" in line
    assert not hostile["marker"].exists()


# ---- resumes --------------------------------------------------------------------------------------------------


def test_a_garbage_trainer_state_is_refused_naming_the_file_and_the_field(hostile, tmp_path):
    one_line_refusal(hostile["runs"]["resume_garbage"], "train", STATE_FILE, "step is 'twelve'", "--resume DIR")
    checkpoint = tmp_path / "c"
    shutil.copytree(hostile["checkpoint"], checkpoint)
    for text, said in (
        ("not json", "cannot be read as JSON"),
        ("[1, 2]", "holds a list"),
        ('{"step": -3}', "step is -3"),
        ('{"run_id": 7}', "run_id is 7, not a string"),
        ('{"best_value": "high"}', "not a number or null"),
        ('{"loader": {"rows_from_nowhere": 1}}', "loader is"),
    ):
        (checkpoint / STATE_FILE).write_text(text)
        with pytest.raises(ConfigError, match=said):
            read_state(checkpoint)


def test_a_resume_with_another_model_is_refused_before_loading(hostile):
    proc = hostile["runs"]["resume_wide"]
    one_line_refusal(proc, "train", str(hostile["checkpoint"]), "d_model 32, now 64", CONFIG)
    assert not (hostile["tmp"] / "r1" / "checkpoints").exists()


def test_a_checkpoint_of_one_launcher_is_refused_under_the_other(hostile, zero_runs, demo_shards, tmp_path):
    launched = hostile["runs"]["ddp_under_deepspeed"]
    assert launched.returncode != 0 and "exitcode  : 2" in launched.stderr, launched.stderr[-3000:]
    ours = [line for line in launched.stderr.splitlines() if line.startswith("dist-train train: error: ")]
    assert len(ours) == 1 and f'File "{REPO / "dist_train"}' not in launched.stderr, launched.stderr[-3000:]
    for fragment in ("DDP / single-process checkpoint", "this run is DeepSpeed ZeRO", "--init_from"):
        assert fragment in ours[0], ours[0]
    rc, log = zero_runs[2].finish()
    assert rc == 0, log[-3000:]
    zero = complete_checkpoints(zero_runs[2].run_dir)[0]
    flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(demo_shards), "--max_steps", "30", "--resume", str(zero)]
    plain = run(["train", *flags, "--output_dir", str(tmp_path / "plain")])
    line = one_line_refusal(plain, "train", str(zero), "DeepSpeed ZeRO checkpoint", "DDP / single-process")
    assert f"--init_from {zero}" in line and not (tmp_path / "plain" / "checkpoints").exists()


# ---- settings that are no numbers ---------------------------------------------------------------------------


def test_non_finite_numbers_are_refused_for_every_setting(hostile):
    one_line_refusal(hostile["runs"]["lr_inf"], "train", "lr: 'inf'", "a finite number")
    floats = [name for name, tp in config_mod._FIELD_TYPES.items() if tp is float]
    assert {"lr", "warmup_lr", "grad_clip", "save_every_minutes", "early_stopping_min_delta"} <= set(floats)
    for name in floats:
        for value in ("inf", "-inf", "nan", float("inf")):
            with pytest.raises(ConfigError, match=f"{name}: .* expected a finite number"):
                config_mod.build({name: value})
    with pytest.raises(ConfigError, match="data_weights"):
        config_mod.build({"data_dir": ["a", "b"], "data_weights": [1.0, "nan"]})
