"""The report as text: report.md, and the lines `dist-train report` prints."""

from __future__ import annotations

from pathlib import Path

from dist_train.report.spell import ep, fmt, num
from dist_train.report.thresholds import Thresholds


def summary_line(name: str, s: dict) -> str:
    if s["best_val_cos"] is None:
        return f"{name} [{s['plan']}]: {ep(s['epochs'])} epochs, {s['steps']} steps, no evaluation yet"
    line = (
        f"{name} [{s['plan']}]: {ep(s['epochs'])} epochs, {s['steps']} steps; best val cos {s['best_val_cos']:.4f} "
        f"at epoch {ep(s['best_epoch'])}, identity baseline {fmt(s['identity_baseline_cos'])}, gain {fmt(s['gain'], '+.4f')}"
    )
    if s["oracle_cos"] is not None:
        line += f", oracle {s['oracle_cos']:.4f} ({fmt(s['fraction_of_oracle_gap'], '.0%')} of the gap closed)"
    if s.get("linear_probe_cos") is not None:
        line += f", linear probe {s['linear_probe_cos']:.4f}"
    if s.get("data_ceiling") is not None:
        ci = s["data_ceiling_ci95"]
        line += f", data ceiling {s['data_ceiling']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    frr = s.get("frr_at_far_1e-3") or {}
    if any(v is not None for v in frr.values()):
        line += "; false-reject rate at FAR 1e-3: " + ", ".join(f"{k} {fmt(v)}" for k, v in frr.items())
    return line + f"; augmentation: {s['augmentation']}"


def render_markdown(results: list[dict], plots: list[Path], th: Thresholds) -> str:
    lines = ["# Training report", ""]
    lines += [
        "| run | plan | epochs | best val cos (epoch) | identity baseline | gain | oracle | gap closed | linear probe "
        "| data ceiling | FRR@1e-3 model / probe / baseline | val/train | findings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        best = "n/a" if s["best_val_cos"] is None else f"{s['best_val_cos']:.4f} ({ep(s['best_epoch'])})"
        codes = ", ".join(f["code"] for f in r["findings"]) or "none"
        ceiling = fmt(s["data_ceiling"])
        if s["data_ceiling_ci95"]:
            ceiling += f" [{s['data_ceiling_ci95'][0]:.3f}, {s['data_ceiling_ci95'][1]:.3f}]"
        frr = " / ".join(fmt(s["frr_at_far_1e-3"][k]) for k in ("model", "probe", "baseline"))
        lines.append(
            f"| {r['run']} | {s['plan']} | {ep(s['epochs'])} | {best} | {fmt(s['identity_baseline_cos'])} | "
            f"{fmt(s['gain'], '+.4f')} | {fmt(s['oracle_cos'])} | {fmt(s['fraction_of_oracle_gap'], '.0%')} | "
            f"{fmt(s['linear_probe_cos'])} | {ceiling} | {frr} | {fmt(s['val_train_loss_ratio'], '.2f')} | {codes} |"
        )
    lines += ["", "## Curves", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    for r in results:
        lines += ["", f"## {r['run']}", "", f"`{r['path']}` — plan: {r['summary']['plan']}", ""]
        lines += [f"- {note}" for note in r["summary"]["data_notes"]] + ([""] if r["summary"]["data_notes"] else [])
        if not r["findings"]:
            lines.append("No findings: nothing in the curves calls for a change.")
        for i, f in enumerate(r["findings"], 1):
            lines += [f"{i}. **{f['severity']}: {f['code']}** — {f['evidence']}", f"   - next: {f['recommendation']}"]
    lines += [
        "",
        f"Thresholds: plateau {num(th.plateau_delta)} over {num(th.plateau_epochs)} epochs, minimum gain "
        f"{num(th.min_gain)}, val/train ratio {num(th.low_ratio)}/{num(th.overfit_ratio)}.",
        "",
    ]
    return "\n".join(lines)


def render_text(results: list[dict], report: Path, plots: list[Path]) -> str:
    """What `dist-train report` prints without --json: a summary line and the findings of each run."""
    lines = []
    for r in results:
        lines.append(summary_line(r["run"], r["summary"]))
        for f in r["findings"]:
            lines.append(f"  [{f['severity']}] {f['code']}: {f['evidence']}\n      -> {f['recommendation']}")
        if not r["findings"]:
            lines.append("  no findings")
    lines.append(f"report: {report} ({len(plots)} plots)")
    return "\n".join(lines)
