"""The curve of bench/migrate.py: downtime (and total) against memory, one line per method.

    .venv/bin/python bench/migrate_plot.py [bench/results/migrate.json]

Writes the PNG next to the JSON (same name, .png); bench/migrate.py calls it after a run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def curve_png(result: dict[str, Any], path: Path) -> Path:
    """Two panels, log-log: median downtime and median total per method against MiB."""
    sizes = sorted(int(mib) for mib in result["summary"])
    fig = Figure(figsize=(11, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for column, (measure, title) in enumerate((("downtime_ms", "downtime"),
                                               ("total_ms", "total time"))):
        ax = fig.add_subplot(1, 2, column + 1)
        for method in result["methods"]:
            ys = [result["summary"][str(mib)][method["key"]][measure] / 1000 for mib in sizes]
            ax.plot(sizes, ys, marker="o", label=method["label"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB"
                              for mib in sizes])
        ax.set_xlabel("touched memory")
        ax.set_ylabel(f"median {title} (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    fig.axes[0].legend(fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"memhog migrated a → b, {result['params']['repeat']} runs per point "
                 f"(godwit {machine['godwit_commit']}, {machine['cpus']} CPUs, load "
                 f"{machine['loadavg_before'][0]:.1f} before)", fontsize=10)
    fig.savefig(path, format="png")
    return path


def main(argv: list[str]) -> int:
    source = Path(argv[0] if argv else "bench/results/migrate.json")
    print(f"wrote {curve_png(json.loads(source.read_text()), source.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
