"""`dist-train report` on TensorBoard event files written here with planted curves.

Each run plants one or more problems (plateau, overfitting, no gain over the
identity baseline, lr/fp16/data trouble) or none (healthy); every diagnosis
must fire where planted and nowhere else.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from dist_train import cli, config
from dist_train.data.schema import YAW_BUCKETS
from dist_train.metrics import TRAIN_TAGS, VAL_EPOCH_TAG, scalars
from dist_train.report import Run, match_rung, next_rung

STEPS_PER_EPOCH = 50
LOG_EVERY = 10
GLOBAL_BATCH = 32


def preset(name: str, **overrides) -> config.Config:
    return config.build({**config.load_yaml(name), "data_dir": None, **overrides})


def cosine_lr(cfg: config.Config, epoch: float, horizon: float | None = None, warmup_power: float = 1.0) -> float:
    """Warmup then cosine to eta_min over `horizon` epochs (default: the config's epochs)."""
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return o.warmup_lr + (o.lr - o.warmup_lr) * (epoch / o.warmup_epochs) ** warmup_power
    t = min(1.0, (epoch - o.warmup_epochs) / ((horizon or cfg.train.epochs) - o.warmup_epochs))
    return o.cosine_eta_min + 0.5 * (o.lr - o.cosine_eta_min) * (1 + math.cos(math.pi * t))


def write_run(root, name, cfg, epochs, cos, *, baseline, ratio, oracle=None, impostor=lambda e: 0.10, lr=None,
              train_loss=lambda e: 0.1 + 0.2 * math.exp(-e / 15), skip_rate=0.0, nonfinite_at=(), bad_rate=0.0,
              fp16=False, tar=None, baseline_tar=0.90):  # fmt: skip
    """A run dir as the trainer leaves it: config.yaml and tb/ with the real tag names."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = root / name
    cfg.save(run_dir)
    lr = lr or (lambda e: cosine_lr(cfg, e))
    noise = np.random.default_rng(len(name)).normal(0, 0.0008, epochs + 1)
    w = SummaryWriter(str(run_dir / "tb"))
    for step in range(LOG_EVERY, epochs * STEPS_PER_EPOCH + 1, LOG_EVERY):
        e = step / STEPS_PER_EPOCH
        values = {
            "loss": train_loss(e),
            "lr": lr(e),
            "epoch": e,
            "skipped_steps": math.floor(skip_rate * step),
            "nonfinite_steps": sum(step >= s for s in nonfinite_at),
            "bad_samples": math.floor(bad_rate * step * GLOBAL_BATCH),
            "samples_seen": step * GLOBAL_BATCH,
        }
        if fp16:
            values["loss_scale"] = 2.0 ** max(8, 16 - step // 200)
        for key, v in values.items():
            w.add_scalar(TRAIN_TAGS[key], v, step)
        if step % STEPS_PER_EPOCH == 0:
            ep = int(e)
            c, b = cos(ep) + noise[ep], baseline + noise[ep]
            m = {
                "mean_cos": c,
                "identity_baseline_cos": b,
                "gain": c - b,
                "impostor_cos": impostor(ep),
                "baseline_impostor_cos": 0.10,
                "loss": ratio(ep) * train_loss(e),
                "val_train_loss_ratio": ratio(ep),
                "per_yaw": {
                    k: {"n": 100, "cos": c + 0.03 - 0.01 * i, "baseline": b + 0.05 - 0.02 * i}
                    | ({"oracle": oracle + 0.02 - 0.01 * i} if oracle else {})
                    for i, k in enumerate(YAW_BUCKETS)
                },
            }
            if oracle is not None:
                m |= {"oracle_cos": oracle, "fraction_of_oracle_gap": (c - b) / (oracle - b)}
            if tar is not None:  # TAR at FAR 1e-3 (model, baseline), as metrics.quality gives it
                m["tar_at_far"] = {"0.001": {"pred": tar(ep), "baseline": baseline_tar}}
            for tag, v in scalars(m).items():
                w.add_scalar(tag, v, step)
            w.add_scalar(VAL_EPOCH_TAG, e, step)
    w.close()
    return run_dir


def healthy_cos(e):
    return 0.70 + 0.20 * (1 - math.exp(-e / 40))


TROUBLE = preset("base", epochs=40, use_mixed_precision=True)
EXPECTED = {
    "plateau": {"plateau", "loss_balance"},
    "overfit": {"overfitting"},
    "no_gain": {"no_gain"},
    "healthy": set(),
    "trouble": {
        "plateau",
        "lr_warmup_not_linear",
        "lr_decays_early",
        "lr_floor_too_low",
        "loss_balance",
        "impostor_rising",
        "skipped_steps",
        "nonfinite_steps",
        "bad_samples",
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        # the design notes' run: base config, cos rises to 0.75 by epoch 20 and stays there, baseline 0.70
        "plateau": write_run(
            root, "plateau", preset("base"), 60, lambda e: 0.70 + 0.05 * min(e / 20, 1), baseline=0.70,
            ratio=lambda e: 1.35,
        ),
        "overfit": write_run(
            root, "overfit", preset("base", mse_weight=0.0, cosine_weight=1.0), 40, lambda e: 0.70 + 0.1 * e / 40,
            baseline=0.70, ratio=lambda e: 1.1 + 0.6 * e / 40,
        ),
        "no_gain": write_run(
            root, "no_gain", preset("plan1-loss", mse_weight=0.0, cosine_weight=1.0), 30, lambda e: 0.72,
            baseline=0.72, oracle=0.90, ratio=lambda e: 1.3, train_loss=lambda e: 0.28,
        ),
        "healthy": write_run(
            root, "healthy", preset("plan1-loss", mse_weight=0.0, cosine_weight=1.0, contrastive_weight=0.1), 60,
            healthy_cos, baseline=0.70, oracle=0.92, ratio=lambda e: 1.3, impostor=lambda e: 0.10 - 0.0005 * e,
        ),
        # cosine horizon 15 epochs in a 40-epoch run, quadratic warmup, fp16 skips, NaNs, corrupt samples,
        # identities merging; cos stalls at epoch 12 while the lr collapses
        "trouble": write_run(
            root, "trouble", TROUBLE, 40, lambda e: 0.70 + 0.08 * min(e / 12, 1), baseline=0.70,
            ratio=lambda e: 1.3, lr=lambda e: cosine_lr(TROUBLE, e, horizon=15, warmup_power=2),
            impostor=lambda e: 0.10 + 0.06 * e / 40, skip_rate=0.05, nonfinite_at=(300, 420, 900), bad_rate=0.005,
            fp16=True,
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """One `dist-train report --json` over all runs (the overlaid comparison)."""
    out = tmp_path_factory.mktemp("report")
    code, stdout = run_cli(["report", *map(str, runs.values()), "--out", str(out), "--json"])
    assert code == 0
    payload = json.loads(stdout)
    return out, {r["run"]: r for r in payload["runs"]}, payload


def run_cli(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_diagnosis_fires_where_planted_and_nowhere_else(report, name):
    findings = report[1][name]["findings"]
    assert {f["code"] for f in findings} == EXPECTED[name]
    order = [f["severity"] for f in findings]
    assert order == sorted(order, key=["critical", "warning", "info"].index)
    for f in findings:
        assert f["evidence"] and f["recommendation"]


def test_plateau_says_when_it_began_and_names_the_next_plan(report):
    run = report[1]["plateau"]
    s = run["summary"]
    assert s["plan"] == "base"
    assert s["best_val_cos"] == pytest.approx(0.75, abs=0.003)
    assert s["identity_baseline_cos"] == pytest.approx(0.70, abs=0.003)
    assert s["gain"] == pytest.approx(0.05, abs=0.004)
    assert s["oracle_cos"] is None and s["fraction_of_oracle_gap"] is None
    (plateau,) = [f for f in run["findings"] if f["code"] == "plateau"]
    start = int(re.search(r"since epoch (\d+)", plateau["evidence"]).group(1))
    assert 17 <= start <= 20  # 0.745 (= best - delta) is reached at epoch 18
    assert "--config plan1-loss" in plateau["recommendation"]
    (balance,) = [f for f in run["findings"] if f["code"] == "loss_balance"]
    assert "0.10%" in balance["evidence"]  # 0.2/256 / (0.2/256 + 0.8)


def test_overfitting_prescribes_the_design_notes_regularisation(report):
    (f,) = report[1]["overfit"]["findings"]
    assert re.search(r"ratio 1\.6\d|ratio 1\.7\d", f["evidence"])
    assert "--dropout 0.2 --weight_decay 2e-4" in f["recommendation"]


def test_no_gain_is_critical_even_though_the_cos_looks_respectable(report):
    run = report[1]["no_gain"]
    (f,) = run["findings"]
    assert f["severity"] == "critical"
    cos, base = re.search(r"best val cos (\S+) at epoch \d+ vs identity baseline (\S+):", f["evidence"]).groups()
    assert cos == base and abs(float(cos) - 0.72) < 0.003 and "learned nothing" in f["evidence"]
    assert "stuck" in f["recommendation"]  # flat train loss: an optimisation problem, not generalisation
    assert run["summary"]["gain"] == pytest.approx(0.0, abs=1e-6)


def test_healthy_run_summary_against_the_oracle(report):
    s = report[1]["healthy"]["summary"]
    best = healthy_cos(60)
    assert s["best_epoch"] == pytest.approx(60, abs=1.5)
    assert s["best_val_cos"] == pytest.approx(best, abs=0.003)
    assert s["oracle_cos"] == pytest.approx(0.92)
    assert s["fraction_of_oracle_gap"] == pytest.approx((best - 0.70) / 0.22, abs=0.02)
    assert s["plan"].startswith("custom, closest plan1-loss")


def test_trouble_run_evidence(report):
    f = {x["code"]: x for x in report[1]["trouble"]["findings"]}
    assert "already decayed" in f["plateau"]["recommendation"]
    assert "5.0%" in f["skipped_steps"]["evidence"]
    assert f["nonfinite_steps"]["evidence"].startswith("3 ")
    assert "0.50%" in f["bad_samples"]["evidence"] and f["bad_samples"]["severity"] == "warning"
    assert "--cosine_eta_min 1e-5" in f["lr_floor_too_low"]["recommendation"]
    assert "--contrastive_weight 0.1" in f["impostor_rising"]["recommendation"]


def test_plots_exist_and_are_nontrivial_pngs(report):
    from matplotlib.image import imread

    out, _, payload = report
    names = {p.split("/")[-1] for p in payload["plots"]}
    assert names == {"loss.png", "cos.png", "lr.png", "loss_ratio.png", "per_yaw.png", "steps.png"}
    for name in names:
        img = imread(out / name)
        assert img.shape[0] >= 300 and img.shape[1] >= 600
        rgb = (img[..., :3] * 255).astype(np.int64)
        colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
        assert len(colours) > 20, f"{name} looks blank"
    md = (out / "report.md").read_text()
    for run in EXPECTED:
        assert f"## {run}" in md
    assert "![cos](cos.png)" in md and "no_gain" in md


def test_threshold_flags_and_text_output(runs, tmp_path):
    code, text = run_cli(
        ["report", str(runs["plateau"]), str(runs["overfit"]), "--out", str(tmp_path), "--plateau_epochs", "50",
         "--overfit_ratio", "2"]
    )  # fmt: skip
    assert code == 0
    assert "plateau" not in re.findall(r"\] (\w+):", text)
    assert "overfitting" not in text
    assert "best val cos 0.75" in text and (tmp_path / "report.md").is_file()
    assert "augmentation: none" in text, "the report says which augmentations were on"


def test_run_without_config_and_default_out_dir(runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(runs["plateau"] / "tb", bare / "tb")
    code, text = run_cli(["report", str(bare), "--json"])
    assert code == 0
    (run,) = json.loads(text)["runs"]
    assert run["summary"]["plan"] == "unknown (no config.yaml)"
    assert [f["code"] for f in run["findings"]] == ["plateau"]
    assert "no config.yaml" in run["findings"][0]["recommendation"]
    assert (bare / "report" / "report.md").is_file()


def test_dir_without_event_files_is_an_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_ladder_keeps_capacity_and_ends_at_xl():
    def rung(cfg):
        name, diff = match_rung(cfg)
        return Run("r", None, {}, cfg, name, diff)

    assert match_rung(preset("xl")) == ("xl", {})
    nxt = next_rung(rung(preset("plan2-capacity")))
    assert nxt.startswith("--config plan3-batch --d_model 768 --num_layers 6 --dim_feedforward 3072 --dropout 0.2")
    assert "batch_size 32->64" in nxt
    assert "ladder ends" in next_rung(rung(preset("xl")))


# ---- the shard set's own figures: data ceiling and linear probe --------------------------------------------

CEILING = 0.80  # synth with tgt_noise 0.75: frontal samples agree with their identity to cos 1 / sqrt(1 + 0.75^2)
PROBE = 0.70  # planted linear probe on the same val split
CLEAN = {"mse_weight": 0.0, "cosine_weight": 1.0}  # no loss_balance finding in the planted data runs
EXPECTED_DATA = {
    "at_limit": {"data_limit"},
    "below_probe": {"below_probe"},
    "between": {"probe_to_ceiling"},
    "short_debug": {"probe_to_ceiling", "loss_balance"},  # the debug-cpu run: flat from epoch 1 of 8
    "regression": set(),  # impostor cos rises, TAR at FAR 1e-3 does not fall: no harm
    "verification": {"verification_drop"},
}


def planted_probe(root, mean_cos: float) -> dict:
    """A probe.json as `dist-train probe` caches it, with chosen figures (keyed to this set's index.json)."""
    from dist_train import probe

    val = {
        "split": "val",
        "n": 360,
        "mean_cos": mean_cos,
        "identity_baseline_cos": 0.60,
        "gain": mean_cos - 0.60,
        "per_yaw": {
            b: {"n": 60, "cos": mean_cos + 0.03 - 0.01 * i, "baseline": 0.65 - 0.02 * i}
            for i, b in enumerate(YAW_BUCKETS)
        },
        "impostor_cos": 0.05,
        "baseline_impostor_cos": 0.0,
        "tar_at_far": {"0.001": {"pred": 0.92, "baseline": 0.90}, "0.01": {"pred": 0.97, "baseline": 0.96}},
    }
    return {
        "probe_version": probe.PROBE_VERSION,
        "index_sha256": probe.set_key(root),
        "train": {"split": "train"},
        "val": val,
    }


@pytest.fixture(scope="module")
def data_set(tmp_path_factory):
    from dist_train.synth import SynthParams, make_shard_set

    root = tmp_path_factory.mktemp("data") / "set"
    make_shard_set(
        root, SynthParams(n_identities=200, samples_per_identity=6, seed=9, tgt_noise=0.75), val_fraction=0.3,
        shard_samples=512, block_size=128,
    )  # fmt: skip
    (root / "probe.json").write_text(json.dumps(planted_probe(root, PROBE)))
    return root


@pytest.fixture(scope="module")
def data_runs(data_set, tmp_path_factory):
    root, d = tmp_path_factory.mktemp("data_runs"), str(data_set)
    plan = preset("plan1-loss", data_dir=d, **CLEAN)
    return {
        # flat at 0.79 from epoch 10: within 0.03 of the ceiling 0.80, above the probe 0.70
        "at_limit": write_run(root, "at_limit", plan, 40, lambda e: 0.60 + 0.19 * min(e / 10, 1), baseline=0.60,
                              ratio=lambda e: 1.3),
        # flat at 0.65: the Transformer does worse than ridge
        "below_probe": write_run(root, "below_probe", plan, 40, lambda e: 0.60 + 0.05 * min(e / 10, 1),
                                 baseline=0.60, ratio=lambda e: 1.3),
        # flat at 0.74 for 30 epochs: above the probe, 0.06 under the ceiling
        "between": write_run(root, "between", plan, 40, lambda e: 0.60 + 0.14 * min(e / 10, 1), baseline=0.60,
                             ratio=lambda e: 1.3),
        # debug-cpu, 8 epochs, 0.75 from epoch 1 on: too short for the 20-epoch plateau rule
        "short_debug": write_run(root, "short_debug", preset("debug-cpu", data_dir=d), 8,
                                 lambda e: 0.60 + 0.15 * min(e, 1), baseline=0.60, ratio=lambda e: 1.3),
        # a regression toward the population mean: impostor cos rises by 0.06, verification holds
        "regression": write_run(root, "regression", plan, 60, lambda e: 0.62 + 0.14 * (1 - math.exp(-e / 40)),
                                baseline=0.60, ratio=lambda e: 1.3, impostor=lambda e: 0.10 + 0.001 * e,
                                tar=lambda e: 0.95),
        # the same curves, but TAR at FAR 1e-3 falls from 0.95 to 0.90, under the baseline's 0.93
        "verification": write_run(root, "verification", plan, 60, lambda e: 0.62 + 0.14 * (1 - math.exp(-e / 40)),
                                  baseline=0.60, ratio=lambda e: 1.3, impostor=lambda e: 0.10 + 0.001 * e,
                                  tar=lambda e: 0.95 - 0.05 * e / 60, baseline_tar=0.93),
    }  # fmt: skip


@pytest.fixture(scope="module")
def data_report(data_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("data_report")
    code, stdout = run_cli(["report", *map(str, data_runs.values()), "--out", str(out), "--json", "--data", "cached"])
    assert code == 0
    payload = json.loads(stdout)
    return out, {r["run"]: r for r in payload["runs"]}, payload


@pytest.mark.parametrize("name", list(EXPECTED_DATA))
def test_data_diagnoses_fire_where_planted_and_nowhere_else(data_report, name):
    findings = data_report[1][name]["findings"]
    assert {f["code"] for f in findings} == EXPECTED_DATA[name]
    s = data_report[1][name]["summary"]
    assert abs(s["data_ceiling"] - CEILING) < 0.02 and s["data_ceiling_identities"] == 60
    assert s["data_ceiling_ci95"][0] < s["data_ceiling"] < s["data_ceiling_ci95"][1]
    assert s["linear_probe_cos"] == PROBE
    assert s["frr_at_far_1e-3"]["probe"] == pytest.approx(0.08)


def test_at_the_data_limit_capacity_will_not_help(data_report):
    (f,) = data_report[1]["at_limit"]["findings"]
    assert f["severity"] == "info"
    assert re.search(r"best val cos 0\.79\d+ .* within 0\.03 of the data ceiling 0\.[78]\d+ \[", f["evidence"])
    assert "60 identities with >= 2 distinct frontal embeddings" in f["evidence"]
    assert "more capacity or epochs will not help" in f["recommendation"]
    assert "--target centroid" in f["recommendation"] and "more identities" in f["recommendation"]


def test_below_the_probe_names_the_setup_flags(data_report):
    (f,) = data_report[1]["below_probe"]["findings"]
    assert "below a linear probe's 0.7000" in f["evidence"]
    rec = f["recommendation"]
    assert rec.startswith("the model setup is the bottleneck")
    # plan1-loss: one embedding token, lr 1e-4, 5 warm-up epochs, residual head already on
    assert "--emb_tokens chunked" in rec and "--lr 3e-4" in rec and "--warmup_epochs" in rec
    assert "--residual_mlp" not in rec


def test_flat_between_probe_and_ceiling_climbs_the_ladder(data_report):
    (f,) = data_report[1]["between"]["findings"]
    assert "between the linear probe 0.7000 and the data ceiling" in f["evidence"]
    assert "next rung: --config plan2-capacity" in f["recommendation"]
    short = {x["code"]: x for x in data_report[1]["short_debug"]["findings"]}["probe_to_ceiling"]
    assert "since epoch 1 (7 epochs, 8 evaluations)" in short["evidence"]


def test_verification_is_judged_by_tar_not_impostor_cos(data_report):
    s = data_report[1]["regression"]["summary"]
    assert s["impostor_cos"] - 0.10 > 0.05  # impostor cos rose well past IMPOSTOR_RISE ...
    assert s["frr_at_far_1e-3"]["model"] == pytest.approx(0.05)  # ... while the false-reject rate held
    (f,) = data_report[1]["verification"]["findings"]
    assert "TAR at FAR 1e-3 0.9000" in f["evidence"] and "identity baseline 0.9300" in f["evidence"]
    assert "linear probe 0.9200" in f["evidence"] and "--contrastive_weight 0.1" in f["recommendation"]


def test_data_figures_in_text_markdown_and_plots(data_report, data_runs, tmp_path):
    from matplotlib.image import imread

    out, _, payload = data_report
    md = (out / "report.md").read_text()
    assert "| linear probe | data ceiling | FRR@1e-3 model / probe / baseline |" in md
    assert re.search(r"\| 0\.7000 \| 0\.[78]\d{3} \[0\.\d{3}, 0\.\d{3}\] \|", md)
    assert {p.split("/")[-1] for p in payload["plots"]} >= {"cos.png", "per_yaw.png"}
    assert imread(out / "cos.png").shape[0] >= 3 * 300  # cos, impostor cos and false-reject rate panels
    code, text = run_cli(["report", str(data_runs["short_debug"]), "--out", str(tmp_path / "t"), "--data", "cached"])
    assert code == 0 and re.search(r"linear probe 0\.7000, data ceiling 0\.[78]\d{3} \[0\.\d{4}, 0\.\d{4}\]", text)
    assert "false-reject rate at FAR 1e-3: model n/a, baseline 0.1000, probe 0.0800" in text  # no TAR logged
    code, text = run_cli(["report", str(data_runs["short_debug"]), "--out", str(tmp_path / "o"), "--data", "off"])
    assert code == 0 and "probe_to_ceiling" not in text and "data ceiling" not in text  # the old report


def test_report_fits_and_caches_the_probe_when_none_is_cached(small_shards, tmp_path):
    from dist_train import probe

    copy = tmp_path / "set"
    shutil.copytree(small_shards, copy)
    run = write_run(tmp_path, "fresh", preset("debug-cpu", data_dir=str(copy)), 8, lambda e: 0.80, baseline=0.78,
                    ratio=lambda e: 1.3)  # fmt: skip
    code, text = run_cli(["report", str(run), "--json", "--data", "cached"])
    (r,) = json.loads(text)["runs"]
    assert r["summary"]["linear_probe_cos"] is None and any(
        "no linear probe cached" in n for n in r["summary"]["data_notes"]
    )
    code, text = run_cli(["report", str(run), "--json"])
    (r,) = json.loads(text)["runs"]
    cached = probe.read_cached(copy)
    assert cached is not None and r["summary"]["linear_probe_cos"] == cached["val"]["mean_cos"]
    assert any("linear probe fitted" in n and str(copy) in n for n in r["summary"]["data_notes"])
