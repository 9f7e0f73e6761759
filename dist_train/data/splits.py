"""The one train/val/test splitter: whole identities per split, rows shuffled within each split.

``pack``, ``synth`` and ``extract`` all split here, so the same identity ids,
fractions and seed put the same identities in the same splits. Shuffling the
rows spreads identities and poses over blocks, so a reader that shuffles
blocks (and rows within a block) still mixes identities within a batch.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are >= 0 and leave identities for training."""
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be >= 0 "
            "and leave identities for training (sum < 1)"
        )


def split_counts(n_ids: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Identities for val and test: rounded shares, and at least one for a requested split while train keeps one."""
    check_fractions(val_fraction, test_fraction)
    n_val = round(n_ids * val_fraction)
    n_test = round(n_ids * test_fraction)
    if val_fraction > 0 and n_val == 0 and n_ids - n_test >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n_ids - n_val >= 2:
        n_test = 1
    if n_ids and n_val + n_test >= n_ids:
        raise ValueError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} of {n_ids} identities take "
            f"{n_val} + {n_test} identities and leave none for training; lower them or add identities"
        )
    return n_val, n_test


def split_rows(identity: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """{split: row indices}, whole identities per split, rows in a seeded random order; empty splits left out.

    A seeded permutation of the sorted unique identities deals the first
    ``n_val`` to val, the next ``n_test`` to test and the rest to train (see
    ``split_counts``); then the same generator shuffles each split's rows, in
    the order train, val, test.
    """
    identity = np.asarray(identity)
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(identity, return_inverse=True)
    order = rng.permutation(len(ids))
    n_val, n_test = split_counts(len(ids), val_fraction, test_fraction)
    split_of = np.empty(len(ids), np.int8)  # index into SPLITS per unique identity
    split_of[order[:n_val]] = 1
    split_of[order[n_val : n_val + n_test]] = 2
    split_of[order[n_val + n_test :]] = 0
    row_split = split_of[inverse.reshape(-1)]
    out = {}
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(row_split == code)
        if len(rows):
            out[name] = rows[rng.permutation(len(rows))]
    return out


def split_by_identity(
    arrays: dict[str, np.ndarray], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """``split_rows`` applied to column arrays: {split: {field: rows of that split, shuffled}}."""
    rows = split_rows(arrays["identity"], val_fraction, test_fraction, seed)
    return {name: {k: v[r] for k, v in arrays.items()} for name, r in rows.items()}
