"""A migration report as a timeline PNG: one bar per phase, the downtime shaded."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BAR_COLOR = "#4878a8"
DOWNTIME_COLOR = "#d62728"


def timeline_png(report: dict, path: Path) -> Path:
    """Render ``report`` (MigrationReport.to_json()) as a PNG at ``path``; returns ``path``."""
    phases = report.get("phases") or []
    fig = Figure(figsize=(8, 1.9 + 0.32 * max(len(phases), 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t0 = report.get("started_at") or min((p["started"] for p in phases), default=0.0)
    _draw_phases(ax, phases, t0)
    _draw_downtime(ax, report, t0)
    ax.set_xlabel("seconds since start")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_title(report), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _draw_phases(ax, phases: list[dict], t0: float) -> None:
    names = [p["name"] for p in phases] or ["(no phases)"]
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.invert_yaxis()  # first phase on top
    for row, phase in enumerate(phases):
        seconds = phase.get("seconds") or ((phase.get("ended") or phase["started"])
                                           - phase["started"])
        ax.barh(row, seconds, left=phase["started"] - t0, height=0.6, color=BAR_COLOR)
        ax.annotate(_seconds(seconds), (phase["started"] - t0 + seconds, row),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)


def _draw_downtime(ax, report: dict, t0: float) -> None:
    frozen, resumed = report.get("frozen_at"), report.get("resumed_at")
    if frozen is None:
        return
    end = resumed or report.get("finished_at") or frozen
    label = f"downtime {_seconds(end - frozen)}" + ("" if resumed else " (not resumed)")
    ax.axvspan(frozen - t0, end - t0, color=DOWNTIME_COLOR, alpha=0.15, label=label, zorder=0)
    ax.axvline(frozen - t0, color=DOWNTIME_COLOR, lw=0.8)
    ax.axvline(end - t0, color=DOWNTIME_COLOR, lw=0.8)
    ax.legend(loc="best", fontsize=8)


def _title(report: dict) -> str:
    route = f"{report.get('source', '?')} → {report.get('destination', '?')}"
    total = report.get("total_s")
    tail = f", {_seconds(total)} total" if total is not None else ""
    return (f"{report.get('container', '?')}: {route} · {report.get('strategy', '?')} · "
            f"{report.get('result', '?')}{tail}")


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"
