"""The run's shard set's own figures, the data ceiling and the linear probe, that tell a limit from a plateau.

Both are costly (a pass over the set), so runs on the same set share one computation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_train.ceiling import data_ceiling
from dist_train.data.shards import INDEX_NAME
from dist_train.probe import probe_for, read_cached, set_key
from dist_train.report.run import Run

_DATA_CACHE: dict[tuple, tuple[dict | None, dict | None, list[str]]] = {}


def attach_data(run: Run, mode: str = "run") -> None:
    """Fill ``run.data`` with the data ceiling and linear probe of the run's shard set (val split).

    ``mode``: "run" computes what is not cached (the probe is cached beside the set, or under
    the run directory when the set is read-only), "cached" only reads the probe's cache, "off"
    skips both. Runs on the same set share one computation.
    """
    if mode == "off":
        return
    if run.config is None or not run.config.data.data_dir:
        run.data = {"notes": ["no data ceiling or linear probe: the run's shard set is unknown (no data_dir)"]}
        return
    d = run.config.data
    root = Path(d.data_dir[0])
    if len(d.data_dir) > 1:
        run.data = {"notes": [f"data ceiling and linear probe of the first of {len(d.data_dir)} shard sets, {root}"]}
    if not (root / INDEX_NAME).is_file():
        run.data = {"notes": [f"no data ceiling or linear probe: {root} holds no shard set here"]}
        return
    key = (str(root.resolve()), set_key(root), d.train_split, d.val_split, mode)
    if key not in _DATA_CACHE:
        notes = []
        if mode == "run" and read_cached(root, run.path, train_split=d.train_split, split=d.val_split) is None:
            print(
                f"dist-train report: fitting the linear probe of {root} (one pass over {d.train_split}, cached for "
                "next time; --data cached skips it)",
                file=sys.stderr,
            )
        try:
            ceiling = data_ceiling(root, d.val_split)
        except (ValueError, OSError) as e:
            ceiling, notes = None, [f"no data ceiling: {e}"]
        if ceiling is not None and not ceiling["estimable"]:
            notes.append(f"data ceiling of {root} ({d.val_split}): {ceiling['reason']}")
        probe, note = probe_for(
            root, run=mode == "run", fallback=run.path, train_split=d.train_split, split=d.val_split
        )
        _DATA_CACHE[key] = (ceiling, probe, [*notes, note])
    ceiling, probe, notes = _DATA_CACHE[key]
    run.data = {"ceiling": ceiling, "probe": probe, "notes": notes}
