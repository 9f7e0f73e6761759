"""PNG figures for `dist-train report`: one figure per question, several runs overlaid, one colour per run.

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot
state), so reports can be written on headless nodes and from tests. A metric a
run did not log (no oracle on real data, no loss scale without fp16) is simply
left out; a figure no run has data for is not written. The shard set's own
figures (`Run.data`: the data ceiling with its 95 % band and the linear
probe) are horizontal lines in the run's colour beside its curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from dist_train.metrics import VERIFY_FAR, tar_tag

DPI = 100


def new_figure(panels: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(8, 3.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return fig, list(axes)


def overlay(ax, runs, colours, get, legend: bool = True, **style) -> bool:
    """Plot `get(run)` (an (epochs, values) pair or None) of every run; True when anything was drawn.

    Only the main line of a run gets a legend entry; the title explains the line styles.
    """
    drawn = False
    for run, colour in zip(runs, colours):
        curve = get(run)
        if curve is not None:
            ax.plot(*curve, color=colour, label=run.name if legend else "_nolegend_", **style)
            drawn = True
    return drawn


def finish(fig: Figure, axes: list, path: Path) -> Path:
    for ax in axes:
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    return path


def plot_loss(runs, colours, th, path: Path) -> Path | None:
    fig, (ax,) = new_figure()
    drawn = overlay(ax, runs, colours, lambda r: r.train("loss"))
    drawn |= overlay(ax, runs, colours, lambda r: r.val("loss"), legend=False, linestyle="--")
    ax.set_ylabel("loss")
    ax.set_title("train (solid) and val (dashed) loss")
    return finish(fig, [ax], path) if drawn else None


CEILING_STYLE = {"linestyle": (0, (1, 1)), "linewidth": 2.5}  # dense dots: the data's ceiling
PROBE_STYLE = {"linestyle": "--", "linewidth": 1.2}  # dashed: the linear probe


def data_lines(ax, runs, colours, ceiling, probe) -> None:
    """Horizontal lines of per-run figures of the shard set: ``ceiling(run)`` -> (value, (lo, hi) or None) or None,
    ``probe(run)`` -> value or None; the ceiling's 95 % interval as a band."""
    for run, colour in zip(runs, colours):
        c = ceiling(run)
        if c is not None:
            ax.axhline(c[0], color=colour, **CEILING_STYLE)
            if c[1]:
                ax.axhspan(c[1][0], c[1][1], color=colour, alpha=0.12, linewidth=0)
        v = probe(run)
        if v is not None:
            ax.axhline(v, color=colour, **PROBE_STYLE)


def ceiling_of(run):
    c = run.ceiling()
    return None if c is None else (c["cos"], c.get("ci95"))


def probe_frr(run):
    p = run.probe()
    tar = None if p is None else p.get("tar_at_far", {}).get(VERIFY_FAR, {}).get("pred")
    return None if tar is None else 1.0 - tar


def frr_curve(run, key: str):
    c = run.curve(tar_tag(key))
    return None if c is None else (c[0], 1.0 - c[1])


def plot_cos(runs, colours, th, path: Path) -> Path | None:
    impostor = any(r.val("impostor_cos") is not None for r in runs)
    frr = any(frr_curve(r, "pred") is not None for r in runs)
    fig, axes = new_figure(1 + impostor + frr)
    ax = axes[0]
    drawn = overlay(ax, runs, colours, lambda r: r.val("mean_cos"))
    overlay(ax, runs, colours, lambda r: r.val("identity_baseline_cos"), legend=False, linestyle=":")
    overlay(ax, runs, colours, lambda r: r.val("oracle_cos"), legend=False, linestyle="-.")
    data_lines(ax, runs, colours, ceiling_of, lambda r: r.probe() and r.probe()["mean_cos"])
    ax.set_ylabel("cos(pred, frontal)")
    ax.set_title(
        "val cos (solid), identity baseline (dotted), oracle (dash-dot),\n"
        "linear probe (dashed), data ceiling (dense dots, 95 % band)"
    )
    k = 1
    if impostor:
        overlay(axes[k], runs, colours, lambda r: r.val("impostor_cos"))
        overlay(axes[k], runs, colours, lambda r: r.val("baseline_impostor_cos"), legend=False, linestyle=":")
        axes[k].set_ylabel("mean impostor cos")
        axes[k].set_title("impostor cos (solid), identity baseline (dotted): a rise alone is no harm, see below")
        k += 1
    if frr:
        overlay(axes[k], runs, colours, lambda r: frr_curve(r, "pred"))
        overlay(axes[k], runs, colours, lambda r: frr_curve(r, "baseline"), legend=False, linestyle=":")
        data_lines(axes[k], runs, colours, lambda r: None, probe_frr)
        axes[k].set_ylabel("false-reject rate")
        axes[k].set_title("false-reject rate at FAR 1e-3 (1 - TAR): model (solid), baseline (dotted), probe (dashed)")
    return finish(fig, axes, path) if drawn else None


def plot_lr(runs, colours, th, path: Path) -> Path | None:
    fig, (ax,) = new_figure()
    drawn = overlay(ax, runs, colours, lambda r: r.train("lr"))
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate (warmup linear, cosine not collapsing early)")
    return finish(fig, [ax], path) if drawn else None


def plot_ratio(runs, colours, th, path: Path) -> Path | None:
    fig, (ax,) = new_figure()
    drawn = overlay(ax, runs, colours, lambda r: r.val("val_train_loss_ratio"))
    for level in (th.low_ratio, th.overfit_ratio):
        ax.axhline(level, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("val loss / train loss")
    ax.set_title(f"val/train loss ratio ({th.low_ratio:g}: regularise less; {th.overfit_ratio:g}: regularise more)")
    return finish(fig, [ax], path) if drawn else None


def plot_per_yaw(runs, colours, th, path: Path) -> Path | None:
    """Grouped bars at each run's best evaluation: cos per |yaw| bucket, with baseline and oracle marks."""
    per_run = [(run, colour, run.yaw_at(best["step"])) for run, colour in zip(runs, colours) if (best := run.best())]
    buckets = list(dict.fromkeys(k for _, _, yaw in per_run for k in yaw))
    if not buckets:
        return None
    fig, (ax,) = new_figure()
    width = 0.8 / len(per_run)
    x = np.arange(len(buckets))
    values = []
    for i, (run, colour, yaw) in enumerate(per_run):
        xs = x + (i - (len(per_run) - 1) / 2) * width
        have = [j for j, b in enumerate(buckets) if b in yaw]
        ax.bar(xs[have], [yaw[buckets[j]]["cos"] for j in have], width, color=colour, label=f"{run.name} (best epoch)")
        for key, marker in (("baseline", "_"), ("oracle", "^")):
            pts = [j for j in have if key in yaw[buckets[j]]]
            ax.scatter(xs[pts], [yaw[buckets[j]][key] for j in pts], marker=marker, color="black", s=60, zorder=3)
        values += [v for entry in yaw.values() for v in entry.values()]
        probe = (run.probe() or {}).get("per_yaw", {})
        ceiling = (run.ceiling() or {}).get("per_yaw", {})
        for marks, get, marker in (
            (probe, lambda e: e["cos"], "x"),
            (ceiling, lambda e: e["cos"] if e.get("estimable") else None, "v"),
        ):
            pts = [(xs[j], get(marks[b])) for j, b in enumerate(buckets) if b in marks and get(marks[b]) is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color="black", s=45, zorder=3)
                values += [v for _, v in pts]
    ax.set_ylim(min(values) - 0.05, max(values) + 0.1)  # hundredths stay visible; room above for the legend
    ax.set_xticks(x, buckets)
    ax.set_xlabel("|yaw| bucket (degrees)")
    ax.set_ylabel("val cos")
    ax.set_title(
        "per-yaw val cos at the best evaluation\n(black -: identity baseline, ^: oracle, x: linear probe, v: data ceiling)"
    )
    ax.legend(fontsize="small", ncols=3, loc="upper center")
    return finish(fig, [ax], path)


STEP_PANELS = (
    ("skipped_steps", "fp16 skipped steps (cumulative)"),
    ("nonfinite_steps", "non-finite losses skipped (cumulative)"),
    ("bad_samples", "bad samples skipped (cumulative)"),
    ("loss_scale", "fp16 loss scale"),
)


def plot_steps(runs, colours, th, path: Path) -> Path | None:
    panels = [(key, title) for key, title in STEP_PANELS if any(r.train(key) is not None for r in runs)]
    if not panels:
        return None
    fig, axes = new_figure(len(panels))
    for ax, (key, title) in zip(axes, panels):
        overlay(ax, runs, colours, lambda r, key=key: r.train(key))
        ax.set_title(title)
        if key == "loss_scale":
            ax.set_yscale("log", base=2)
    return finish(fig, axes, path)


FIGURES = (
    ("loss.png", plot_loss),
    ("cos.png", plot_cos),
    ("lr.png", plot_lr),
    ("loss_ratio.png", plot_ratio),
    ("per_yaw.png", plot_per_yaw),
    ("steps.png", plot_steps),
)


def write_plots(runs, out_dir: Path, th) -> list[Path]:
    """Write every figure some run has data for; returns their paths."""
    cmap = colormaps["tab10"]
    colours = [cmap(i % cmap.N) for i in range(len(runs))]
    written = [draw(runs, colours, th, Path(out_dir) / name) for name, draw in FIGURES]
    return [p for p in written if p is not None]
