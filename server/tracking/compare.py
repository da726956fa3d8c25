"""``fedpriv compare DIR [DIR ...] [--out FILE.html]``: how utility trades against ε across runs.

Each DIR is a run directory or a Hydra multirun directory (all its jobs): the runs are read
(``server.tracking.runs``), shown as a table on the terminal, and drawn on a page
(``server.tracking.page``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from common.rundir import RunDir, SweepDir
from server.tracking.page import write_page
from server.tracking.runs import CompareError, Comparison, collect, differing, same_data

__all__ = ["CompareError", "compare", "default_page", "show_comparison"]


def compare(dirs: Iterable[Path], out: Path) -> Comparison:
    """Read the runs under ``dirs``, check they share their data, and write the page to ``out``."""
    runs, skipped = collect([Path(d) for d in dirs])
    if not runs:
        raise CompareError("no finished run (one with privacy_report.json) in " + ", ".join(map(str, dirs)))
    same_data(runs)
    comparison = Comparison(runs, differing([run.config for run in runs]), skipped)
    comparison.page = write_page(comparison, Path(out))
    return comparison


def show_comparison(dirs: list[Path], out: Path | None) -> int:
    """``fedpriv compare``: the table on the terminal, the page's path last; 2 when refused."""
    from rich.console import Console

    try:
        found = compare(dirs, out or default_page(dirs))
    except CompareError as err:
        print(f"fedpriv compare: {err}", file=sys.stderr)
        return 2
    Console().print(found.table())
    for note in found.skipped:
        print(f"fedpriv compare: {note}")
    print(f"fedpriv: comparison page: {found.page}")
    return 0


def default_page(dirs: list[Path]) -> Path:
    """One multirun directory: its ``comparison.html``; else ``comparison.html`` here."""
    if len(dirs) == 1 and not RunDir(dirs[0]).is_run():
        return SweepDir(dirs[0]).comparison
    return Path("comparison.html")
