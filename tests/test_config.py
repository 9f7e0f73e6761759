"""Configuration: presets, the design notes' flags, and rejection of invalid input before work starts."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_train import config
from dist_train.config import ConfigError
from dist_train.plan import open_shard_sets

REPO = Path(__file__).resolve().parent.parent

# The design notes' scheme-1 command line, verbatim flags.
SCHEME_1 = (
    "--batch_size 32 --epochs 150 --lr 1e-4 --warmup_epochs 10 --warmup_lr 1e-6 --scheduler_type cosine "
    "--cosine_eta_min 1e-5 --weight_decay 1e-4 --dropout 0.15 --mse_weight 0.1 --cosine_weight 0.9 "
    "--use_mixed_precision --early_stopping_patience 20 --early_stopping_min_delta 1e-4"
).split()
SCHEME_2 = "--d_model 768 --dim_feedforward 3072 --num_layers 6 --dropout 0.2 --nhead 8".split()


def parse(argv, data_dir=None):
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    args = p.parse_args(argv + (["--data_dir", str(data_dir)] if data_dir else ["--data_dir", "null"]))
    return config.from_args(args)


def test_design_notes_flags_parse_verbatim():
    cfg = parse(SCHEME_1 + SCHEME_2 + "--output_dir o --max_steps 5 --seed 3 --resume latest".split())
    assert cfg.loss.mse_weight == 0.1 and cfg.loss.cosine_weight == 0.9
    assert cfg.optim.warmup_epochs == 10 and cfg.optim.cosine_eta_min == 1e-5 and cfg.optim.warmup_lr == 1e-6
    assert cfg.train.use_mixed_precision is True and cfg.train.epochs == 150
    assert cfg.model.d_model == 768 and cfg.model.num_layers == 6 and cfg.model.dim_feedforward == 3072
    assert cfg.train.max_steps == 5 and cfg.train.seed == 3 and cfg.checkpoint.resume == "latest"
    assert cfg.train.gradient_accumulation_steps == 1


@pytest.mark.parametrize(
    "preset,checks",
    [
        (
            "base",
            {
                "d_model": 512,
                "dim_feedforward": 2048,
                "num_layers": 4,
                "nhead": 8,
                "dropout": 0.15,
                "batch_size": 32,
                "lr": 1e-4,
                "warmup_epochs": 5,
                "warmup_lr": 1e-6,
                "cosine_eta_min": 1e-6,
                "weight_decay": 1e-4,
                "mse_weight": 0.2,
                "cosine_weight": 0.8,
                "epochs": 100,
                "early_stopping_patience": 20,
                "early_stopping_min_delta": 1e-4,
                "use_mixed_precision": True,
            },
        ),
        (
            "plan1-loss",
            {
                "mse_weight": 0.1,
                "cosine_weight": 0.9,
                "warmup_epochs": 10,
                "epochs": 150,
                "cosine_eta_min": 1e-5,
                "batch_size": 32,
                "d_model": 512,
            },
        ),
        (
            "plan2-capacity",
            {
                "d_model": 768,
                "dim_feedforward": 3072,
                "num_layers": 6,
                "dropout": 0.2,
                "mse_weight": 0.1,
                "epochs": 150,
                "early_stopping_patience": 20,
            },
        ),
        (
            "plan3-batch",
            {"batch_size": 64, "epochs": 200, "early_stopping_patience": 25, "d_model": 512, "cosine_eta_min": 1e-5},
        ),
        ("xl", {"d_model": 768, "num_layers": 8, "nhead": 16, "batch_size": 128}),
        ("debug-cpu", {"use_mixed_precision": False}),
    ],
)
def test_presets_match_the_design_notes(preset, checks):
    values = config.load_yaml(preset)
    values["data_dir"] = None
    cfg = config.build(values)
    for key, want in checks.items():
        sec, _ = config.FLAT[key]
        assert getattr(getattr(cfg, sec), key) == want, (preset, key)


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--d_model", "500", "--nhead", "8"], ["d_model", "500", "divisible by nhead"]),
        (["--batch_size", "0"], ["batch_size", "0", "positive"]),
        (["--num_layers", "-2"], ["num_layers", "-2", "positive"]),
        (["--lr", "fast"], ["lr", "'fast'", "a finite number"]),
        (["--epochs", "2.5"], ["epochs", "2.5", "integer"]),
        (["--warmup_epochs", "100", "--epochs", "100"], ["warmup_epochs", "100", "smaller than epochs"]),
        (["--mse_weight", "0", "--cosine_weight", "0"], ["all zero"]),
        (["--scheduler_type", "linear"], ["scheduler_type", "'linear'", "'cosine'", "'cosine_restarts'"]),
        (["--use_mixed_precision", "maybe"], ["use_mixed_precision", "true or false"]),
        (["--dropout", "1.5"], ["dropout", "[0, 1)"]),
        (["--max_bad_steps", "0"], ["max_bad_steps", "0", "positive"]),  # 0 stopped every run at step 1
    ],
)
def test_invalid_values_name_key_value_and_allowed(argv, fragments):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_unknown_yaml_keys_and_bad_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 768\n")
    with pytest.raises(ConfigError, match=r"unknown key model.d_modle; allowed in model: \[.*'d_model'"):
        config.load_yaml(bad)
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        config.load_yaml(bad)
    bad.write_text("base: base\ntrain:\n  batch_size: [32]\n")
    with pytest.raises(ConfigError, match=r"batch_size: \[32\] is not valid; expected an integer"):
        config.build(config.load_yaml(bad))
    with pytest.raises(ConfigError, match="not found: give a YAML file path or one of the presets"):
        config.load_yaml("no-such-preset")


def test_data_dir_without_shard_set_is_rejected_when_the_run_opens_it(tmp_path):
    cfg = parse([], data_dir=tmp_path)  # validation does no I/O; the run's data check does
    with pytest.raises(ConfigError, match=r"data_dir: .* holds no shard set \(no index.json\); create one with"):
        open_shard_sets(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        open_shard_sets(parse([], data_dir=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="data_dir: not set; pass --data_dir DIR"):
        open_shard_sets(parse([]))


def test_resolved_config_round_trips(tmp_path):
    cfg = parse(SCHEME_1 + ["--d_model", "256", "--nhead", "4"])
    path = cfg.save(tmp_path)
    assert yaml.safe_load(path.read_text())["model"]["d_model"] == 256
    assert config.load_run_config(tmp_path) == cfg


def test_cli_rejects_before_starting(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dist_train", "train", "--d_model", "100", "--nhead", "3"]
        + ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "d_model: 100 is not allowed; must be divisible by nhead (3)" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing is created before validation


def test_every_train_flag_says_what_it_does_and_shows_the_presets_value():
    docs = config._field_docs()
    assert set(docs) == set(config.FLAT) and all(len(d.split()) >= 3 for d in docs.values()), [
        k for k, d in docs.items() if len(d.split()) < 3
    ]
    out = subprocess.run(
        [sys.executable, "-m", "dist_train", "train", "--config", "xl", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "--d_model D_MODEL width of the Transformer (token size) [an integer; default 512; xl: 768]" in text
    assert "clip the global gradient norm to this; 0: no clipping [a finite number; default 1.0]" in text
    for section in ("data:", "augment:", "model:", "loss:", "optim:", "train:", "eval:", "checkpoint:", "log:"):
        assert f"\n{section}\n" in out.stdout, section


@pytest.mark.parametrize(
    "command, flag, other",
    [
        (["pack", "--npz", "/nonexistent.npz", "--out", "/tmp/x"], "--val-fraction", "--val_fraction"),
        (["inspect", "/nonexistent"], "--split", "--split"),
        (["train", "--data_dir", "/nonexistent"], "--batch_size", "--batch-size"),
        (["eval", "--checkpoint", "/none", "--shards", "/none"], "--batch_size", "--batch-size"),
    ],
)
def test_every_command_takes_both_spellings_of_a_flag(command, flag, other):
    """A flag is refused only for what it says, never for its spelling (argparse would exit 2 with 'unrecognized')."""
    for spelled in (flag, other):
        out = subprocess.run(
            [sys.executable, "-m", "dist_train", *command, spelled, "3" if "batch" in spelled else "0.2"],
            capture_output=True,
            text=True,
        )
        assert "unrecognized arguments" not in out.stderr and "error" in out.stderr, out.stderr[-500:]


def test_settings_live_in_the_section_that_decides_them_and_old_placements_still_load(tmp_path):
    old = tmp_path / "old.yaml"  # written before early stopping and resume moved out of train:
    old.write_text("train:\n  early_stopping_patience: 7\n  resume: latest\n  batch_size: 16\n")
    cfg = config.build(config.load_yaml(old))
    assert (cfg.eval.early_stopping_patience, cfg.checkpoint.resume, cfg.train.batch_size) == (7, "latest", 16)
    stored = cfg.to_dict()
    assert "early_stopping_patience" in stored["eval"] and "resume" in stored["checkpoint"]
    stored["train"]["monitor"] = stored["eval"].pop("monitor")  # a run config stored before the move
    stored["train"]["monitor"] = "loss"
    assert config.config_from_dict(stored).eval.monitor == "loss"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  early_stopping_patience: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key model.early_stopping_patience; allowed in model"):
        config.load_yaml(bad)
