"""Rich rendering of container lists, migration progress and reports."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from godwit.cli.common import console


def size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def containers_table(rows: list[dict]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "HOST", "STATUS", "PID", "FROM", "IMAGE"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["host"], row["status"], str(row["pid"]),
                      row.get("origin") or "", short_image(row))
    return table


def short_image(row: dict) -> str:
    """`NAME[:TAG]@DIGEST12` of a container run from an image ('' for a bundle)."""
    if not row.get("image"):
        return ""
    digest = (row.get("image_digest") or "").removeprefix("sha256:")[:12]
    return f"{row['image'].rsplit('/', 1)[-1]}@{digest}"


LEVEL_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "error": "[red]error[/]"}


def findings_table(found: dict) -> Table:
    """Pre-flight findings per source host (or the error that stopped the check)."""
    table = Table(box=None, header_style="bold")
    for column in ("FROM", "CHECK", "LEVEL", "DETAIL"):
        table.add_column(column)
    for source, result in found.items():
        if isinstance(result, Exception):
            table.add_row(source, "agent", LEVEL_STYLE["error"], str(result))
            continue
        for f in result["findings"]:
            table.add_row(source, f["check"], LEVEL_STYLE.get(f["level"], f["level"]),
                          f["message"])
    return table


def report_table(report: dict) -> Table:
    """The figures of one migration, phases last."""
    table = Table(title=f"migration {report['id'][:8]} of {report['container']}",
                  box=None, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("result", f"{report['result']}: {report.get('outcome', '')}"),
        ("route", f"{report['source']} → {report['destination']} ({report['strategy']})"),
        ("downtime", seconds(report.get("downtime_s"))),
        ("total", seconds(report.get("total_s"))),
        ("images", size(report.get("image_bytes"))),
        ("rootfs", size(report.get("rootfs_bytes"))),
        ("on the wire", size(report.get("wire_bytes"))),
    ]
    if report.get("error"):
        rows.insert(1, ("error", report["error"]))
    if report.get("image"):
        rows.insert(2, ("from image", f"{report['image']} ({report.get('image_digest')})"))
    for key, value in rows:
        table.add_row(key, value)
    for phase in report.get("phases", []):
        table.add_row(f"  {phase['name']}", seconds(phase.get("seconds")))
    return table


async def follow_migration(events: AsyncIterator[dict]) -> dict:
    """Show phases and transfer bars while a migration runs; return its report."""
    report: dict = {}
    bars: dict[str, TaskID] = {}
    columns = (TextColumn("  {task.description:<12}"), BarColumn(), DownloadColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        async for event in events:
            kind = event["event"]
            if kind == "progress":
                name = event["name"]
                if name not in bars:
                    bars[name] = progress.add_task(name, total=event["total"] or 1)
                progress.update(bars[name], completed=event["done"], total=event["total"] or 1)
            elif kind == "phase" and event["state"] == "end":
                progress.console.print(f"  [green]✓[/] {event['name']:<12} "
                                       f"{seconds(event.get('seconds'))}")
            elif kind == "log":
                progress.console.print(f"  {event['message']}")
            elif kind == "result":
                report = event["report"]
    return report
