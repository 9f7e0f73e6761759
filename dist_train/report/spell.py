"""How the report writes numbers and flags, so evidence and recommendations read like the design notes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_train.report.run import Run


def num(v) -> str:
    """A number as a flag value, the way the design notes write them (2e-4, 0.2, 768)."""
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def ep(e: float) -> str:
    return f"{e:.0f}" if abs(e - round(e)) < 0.05 else f"{e:.1f}"


def fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def data_dir(run: Run) -> str:
    """The run's shard set directories, as they go on a command line."""
    return " ".join((run.config and run.config.data.data_dir) or ["DATA_DIR"])
