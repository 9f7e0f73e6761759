"""`dist-train export`, `Frontalizer` and `dist-train frontalize` on checkpoints of real 2-process ZeRO-2 and
ZeRO-3 runs (conftest's shared `zero_runs`, so nothing trains twice).

The reference is `dist-train eval --predictions`, which loads the sharded DeepSpeed checkpoint itself: the
exported ONNX graph and consolidated file must reproduce its predictions row for row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dist_train import cli
from dist_train.checkpoint import CONSOLIDATED, complete_checkpoints, load_consolidated
from dist_train.data.blocks import read_split
from dist_train.data.schema import MODEL_INPUTS
from dist_train.data.shards import ShardSet
from dist_train.export import ONNX_NAME, OUTPUT, PARITY_TOL
from dist_train.frontalize import Frontalizer

ATOL = 1e-4
PARITY_ROWS = 256  # export's default --n


@dataclass
class Exported:
    checkpoint: Path
    out: Path  # export directory
    export_rc: int
    predictions: np.ndarray  # `dist-train eval --predictions` on the checkpoint, val rows in split order
    val: dict[str, np.ndarray]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda stage: f"zero{stage}")
def exported(request, zero_runs, demo_shards, tmp_path_factory) -> Exported:
    run = zero_runs[request.param]
    rc, log = run.finish()
    assert rc == 0, log[-3000:]
    checkpoint = complete_checkpoints(run.run_dir)[-1]
    tmp = tmp_path_factory.mktemp(f"export_zero{request.param}")
    out = tmp / "export"
    export_rc = cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--shards", str(demo_shards)])
    preds = tmp / "pred.npy"
    eval_argv = ["eval", "--checkpoint", str(checkpoint), "--shards", str(demo_shards), "--predictions", str(preds)]
    assert cli.main(eval_argv) == 0
    val = read_split(ShardSet.open(demo_shards), "val")
    return Exported(checkpoint, out, export_rc, np.load(preds), val)


def test_export_of_a_sharded_checkpoint_passes_the_onnx_parity_check(exported, demo_shards):
    assert exported.export_rc == 0
    report = json.loads((exported.out / "export.json").read_text())
    assert report["parity_ok"] is True
    assert report["parity_max_abs_diff"] < PARITY_TOL <= ATOL
    assert report["parity_rows"] == PARITY_ROWS and report["parity_inputs"] == str(demo_shards)
    assert (exported.out / ONNX_NAME).is_file()
    _, cfg, meta = load_consolidated(exported.out / CONSOLIDATED)
    assert meta["exported_from"] == str(exported.checkpoint)
    assert cfg.model.d_model == 32, "the run's model config travels with the weights"


@pytest.mark.parametrize("name, backend", [(ONNX_NAME, "onnx"), (CONSOLIDATED, "torch")])
def test_frontalizer_on_exported_files_reproduces_eval_predictions_row_for_row(exported, name, backend):
    model = Frontalizer.load(exported.out / name)
    assert model.backend == backend
    pred = model.frontalize(*(exported.val[k] for k in MODEL_INPUTS))
    assert pred.shape == exported.predictions.shape == (len(exported.val["src_emb"]), 512)
    np.testing.assert_allclose(pred, exported.predictions, atol=ATOL)
    identity = exported.val["src_emb"] / np.linalg.norm(exported.val["src_emb"], axis=1, keepdims=True)
    assert np.abs(pred - identity).max() > 100 * ATOL, "a trained model, or the comparison proves nothing"
    np.testing.assert_allclose(np.linalg.norm(pred, axis=1), 1.0, atol=1e-5)


def test_frontalize_command_round_trips_an_npz(exported, tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, **{k: exported.val[k] for k in (*MODEL_INPUTS, "identity")})
    out = tmp_path / "out.npz"
    assert cli.main(["frontalize", "--model", str(exported.out / ONNX_NAME), "--npz", str(src), "--out", str(out)]) == 0
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert set(got) == {*MODEL_INPUTS, "identity", OUTPUT}
    for k in (*MODEL_INPUTS, "identity"):
        np.testing.assert_array_equal(got[k], exported.val[k])
    assert got[OUTPUT].dtype == np.float32
    np.testing.assert_allclose(got[OUTPUT], exported.predictions, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got[OUTPUT], axis=1), 1.0, atol=1e-5)


def test_frontalize_command_names_the_missing_array(exported, tmp_path, capsys):
    src = tmp_path / "in.npz"
    np.savez(src, src_emb=exported.val["src_emb"], src_kps=exported.val["src_kps"])
    out = tmp_path / "out.npz"
    assert cli.main(["frontalize", "--model", str(exported.out / ONNX_NAME), "--npz", str(src), "--out", str(out)]) == 2
    assert "lacks arrays ['src_pose']" in capsys.readouterr().err
    assert not out.exists()
