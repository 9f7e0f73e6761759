"""The data check: a shard set that cannot give a run what it reads is refused before training, in one line.

Each case edits a copy of `small_shards` the way a broken or lying set would look and runs the real
`dist-train train` with the fast flags and two steps: a set wrongly accepted trains and exits 0 (or
fails later with a traceback), so exit 2, one stderr line naming the problem and no run directory
can only come from the check.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN_FLAGS, REPO, RUN_ENV, RUN_TIMEOUT_S, free_port

from dist_train.data import blocks, shards
from dist_train.data.schema import check_arrays
from dist_train.data.stream import TrainStream
from dist_train.frontalize import Frontalizer

REFUSAL_TIMEOUT_S = 120  # a refusal takes a second or two (more on a busy machine); a FIFO opened blocking hangs


def dist_train(*args: str) -> subprocess.CompletedProcess:
    """The command's result; raises TimeoutExpired (the test fails) if it blocks."""
    return subprocess.run(
        [sys.executable, "-m", "dist_train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | RUN_ENV,
        timeout=REFUSAL_TIMEOUT_S,
    )


def assert_refused(out: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2, one line on stderr naming each of ``named``, no traceback."""
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, err[-3000:], out.stdout[-2000:])
    assert "\n" not in err and "Traceback" not in err, err[-3000:]
    for name in named:
        assert name in err, (name, err)


def edit_index(root: Path, change) -> None:
    index = json.loads((root / "index.json").read_text())
    change(index)
    (root / "index.json").write_text(json.dumps(index))


def rewrite_members(tar_path: Path, change) -> None:
    """Rewrite a tar, each member's bytes replaced by ``change(name, data)`` (a whole, valid tar)."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            data = change(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def as_int8(name: str, data: bytes) -> bytes:
    if not name.endswith(".src_emb.npy"):
        return data
    a = np.load(io.BytesIO(data), allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, (a * 100).astype(np.int8), allow_pickle=False)
    return buf.getvalue()


def shard(index: dict, split: str = "train", i: int = 0) -> dict:
    return index["splits"][split]["shards"][i]


def more_rows_declared(index: dict) -> None:  # counts that add up, but more than the tar holds
    shard(index)["n_samples"] += 128
    index["splits"]["train"]["n_samples"] += 128


def fewer_rows_declared(index: dict) -> None:  # a block beyond the declared count
    shard(index)["n_samples"] -= 128
    index["splits"]["train"]["n_samples"] -= 128


def listed_twice(index: dict) -> None:
    index["splits"]["train"]["shards"].append(dict(shard(index)))
    index["splits"]["train"]["n_samples"] += shard(index)["n_samples"]


def empty_split(split: str):
    def change(index: dict) -> None:
        index["splits"][split] = {"shards": [], "n_samples": 0, "n_identities": 0}

    return change


def every_block_unreadable(split: str):
    def change(root: Path) -> None:
        for entry in json.loads((root / "index.json").read_text())["splits"][split]["shards"]:
            (root / entry["file"]).write_bytes(b"not a tar" * 100)

    return change


def every_embedding_int8(root: Path) -> None:
    for path in sorted(root.glob("train-*.tar")):
        rewrite_members(path, as_int8)


def fifo_shard(root: Path) -> None:
    path = root / "train-000003.tar"
    path.unlink()
    os.mkfifo(path)


def index_change(change):
    return lambda root: edit_index(root, change)


CASES = {
    # what the index says against what its tars hold (the header scan)
    "more rows declared than the tar holds": (
        index_change(more_rows_declared),
        ["train-000000.tar", "holds 384 rows", "the tar holds 256 rows"],
    ),
    "a block beyond the declared count": (
        index_change(fewer_rows_declared),
        ["train-000000.tar", "holds 128 rows", "the tar holds 256 rows"],
    ),
    # index.json's own structure and arithmetic
    "split total disagrees with its shards": (
        index_change(lambda i: i["splits"]["train"].update(n_samples=1681)),
        ["split 'train' has n_samples 1681", "add up to 1680"],
    ),
    "a shard listed twice": (index_change(listed_twice), ["'train-000000.tar' is listed twice"]),
    "a negative count": (index_change(lambda i: shard(i).update(n_samples=-5)), ["n_samples -5"]),
    "a string count": (index_change(lambda i: shard(i).update(n_samples="256")), ["n_samples '256'"]),
    "a shard entry that is not an object": (
        index_change(lambda i: i["splits"]["train"]["shards"].__setitem__(0, "train-000000.tar")),
        ["shard entry 'train-000000.tar'", "not an object"],
    ),
    "no fields key": (index_change(lambda i: i.pop("fields")), ["'fields' is None"]),
    "block_size 0": (index_change(lambda i: i.update(block_size=0)), ["block_size is 0"]),
    # every split the run reads has readable rows
    "empty train split": (index_change(empty_split("train")), ["split 'train'", "is empty"]),
    "empty val split": (index_change(empty_split("val")), ["split 'val'", "is empty"]),
    "empty test split": (index_change(empty_split("test")), ["split 'test'", "is empty"]),
    "every train block unreadable": (every_block_unreadable("train"), ["split 'train'", "hold no readable block"]),
    "every val block unreadable": (every_block_unreadable("val"), ["split 'val'", "hold no readable block"]),
    "integer embeddings": (every_embedding_int8, ["hold no readable block", "'src_emb' has dtype int8"]),
    # only regular files are opened: a FIFO would block the first reader for ever
    "a FIFO shard": (fifo_shard, ["train-000003.tar", "is a FIFO, not a regular file"]),
}


@pytest.fixture(scope="module")
def refusals(small_shards, tmp_path_factory) -> dict:
    """Every case's broken copy, trained on by `dist-train train`, a few processes at a time."""
    tmp = tmp_path_factory.mktemp("refusals")

    def attempt(i: int, case: str):
        root, run_dir = tmp / f"set{i}", tmp / f"run{i}"
        shutil.copytree(small_shards, root)
        CASES[case][0](root)
        flags = [*FAST_TRAIN_FLAGS, "--data_dir", str(root), "--output_dir", str(run_dir), "--max_steps", "2"]
        return dist_train("train", *flags), run_dir

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(attempt, i, case) for i, case in enumerate(CASES)}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_train_refuses_a_broken_set_in_one_line_before_any_file(refusals, case):
    out, run_dir = refusals[case]
    assert_refused(out, "dist-train train: error: data_dir:", *CASES[case][1])
    assert not run_dir.exists()


def test_eval_max_samples_below_the_process_count_is_refused_by_every_rank_before_the_process_group(
    small_shards, tmp_path
):
    """Two DDP processes and --eval_max_samples 1 (each would evaluate no row): each rank refuses in one line."""
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu/ddp.yaml"]
    launch += ["--main_process_port", str(free_port()), "-m", "dist_train", "train"]
    flags = [*FAST_TRAIN_FLAGS, "--eval_max_samples", "1", "--data_dir", str(small_shards)]
    out = subprocess.run(
        [*launch, *flags, "--output_dir", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | RUN_ENV,
        timeout=RUN_TIMEOUT_S,
    )
    log = out.stdout + out.stderr
    said = "dist-train train: error: eval_max_samples: 1 is fewer than the 2 processes"
    assert out.returncode != 0 and log.count(said) == 2, log[-3000:]
    assert "exitcode: 2" in log and f'File "{REPO / "dist_train"}' not in log, log[-3000:]  # the launcher's own trace
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def lying_set(small_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lying") / "set"
    shutil.copytree(small_shards, root)
    edit_index(root, more_rows_declared)
    return root


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{root}"],
        ["probe", "{root}", "--no-cache"],
        ["eval", "--checkpoint", "{root}/none", "--shards", "{root}", "--split", "train"],
    ],
    ids=lambda c: c[0],
)
def test_other_commands_refuse_a_lying_set_the_same_way(lying_set, command):
    out = dist_train(*(c.format(root=lying_set) for c in command))
    assert_refused(out, f"dist-train {command[0]}: error:", "train-000000.tar", "holds 384 rows", "holds 256 rows")


# --- the header scan, in process ------------------------------------------------------------------


def test_a_tar_cut_at_a_member_boundary_is_damage_counted_not_a_lie(small_shards, tmp_path):
    """No end-of-archive marker: the scan says so, the missing block is bad and its rows counted, the set opens."""
    root = tmp_path / "cut"
    shutil.copytree(small_shards, root)
    path = root / "train-000000.tar"
    with tarfile.open(path) as tar:
        second = next(i for i in tar if i.name.startswith("b000001."))
    path.write_bytes(path.read_bytes()[: second.offset])
    table = blocks.readable_split(shards.ShardSet.open(root), "train")
    assert "without its end-of-archive marker" in table.shard_errors[str(path)]
    assert [b.problem is None for b in table.blocks[:2]] == [True, False] and table.n_rows == 1680


def test_integer_embeddings_are_refused_where_arrays_are_written_or_frontalized():
    arrays = {
        "src_emb": np.ones((2, 512), np.int16),
        "src_kps": np.zeros((2, 68, 3), np.float32),
        "src_pose": np.zeros((2, 3), np.float32),
        "tgt_emb": np.ones((2, 512), np.float32),
        "identity": np.arange(2),
    }
    with pytest.raises(ValueError, match="'src_emb' has dtype int16; it must be a floating-point dtype"):
        check_arrays(arrays)
    with pytest.raises(ValueError, match="'identity' has dtype float32; it must be an integer dtype"):
        check_arrays(arrays | {"src_emb": arrays["tgt_emb"], "identity": np.zeros(2, np.float32)})
    ran = []
    model = Frontalizer(lambda x: ran.append(x) or np.zeros((2, 512), np.float32), "test")
    with pytest.raises(ValueError, match="'src_emb' has dtype int16; it must be a floating-point dtype"):
        model.frontalize(arrays["src_emb"], arrays["src_kps"], arrays["src_pose"])
    assert not ran
    assert model.frontalize(arrays["tgt_emb"], arrays["src_kps"], arrays["src_pose"]).shape == (2, 512) and ran


def test_a_fifo_given_as_a_loose_shard_file_is_never_opened_blocking(tmp_path):
    """Named, it is refused by type; matched by a glob, the scan's non-blocking open refuses it."""
    fifo = tmp_path / "x.tar"
    os.mkfifo(fifo)
    errors = {}

    def build(source: str) -> None:
        try:
            TrainStream([source], batch_size=4, batches_per_epoch=1, num_workers=0)
        except ValueError as e:
            errors[source] = str(e)

    for source in (str(fifo), str(tmp_path / "x*.tar")):
        thread = threading.Thread(target=build, args=(source,), daemon=True)
        thread.start()
        thread.join(REFUSAL_TIMEOUT_S)
        assert not thread.is_alive(), f"opening a FIFO shard ({source}) blocked"
        assert "is a FIFO, not a regular file" in errors[source], errors
