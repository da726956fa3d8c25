"""Reading a run directory (DESIGN.md "Run directory"): the one reader of ``metrics.jsonl``.

The server's resume (``server.round.checkpoint.completed_rounds``), ``fedpriv report RUN_DIR``
and the benchmarks all read a run's rounds through :func:`read_metrics`, so that they
agree on what a torn last line means. The file is written only by appending one line
per completed round (``server.round.loop``), after that round's checkpoint is durable.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.report.build import build_report
from common.report.render import write_report
from common.rundir import RunDir
from common.storage import read_json_lines


def read_metrics(run_dir: Path, *, missing_ok: bool = False) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl``, in file order.

    A last line without its newline is a round whose append was cut short by a crash:
    that round never completed, so it is skipped if it does not parse. Any other bad
    line is corruption and raises ``ValueError`` naming the line. A missing file is
    ``FileNotFoundError``, or no rounds with ``missing_ok`` (a run that has not
    completed one yet).
    """
    path = RunDir(run_dir).metrics
    if missing_ok and not path.exists():
        return []
    return read_json_lines(_required(path))


def read_evaluation(run_dir: Path) -> dict | None:
    """``run_dir/evaluation.json``, or None where the run wrote none (one from before
    per-class results, or one that completed no round). A file that is not a JSON object
    raises ``ValueError`` naming it."""
    path = RunDir(run_dir).evaluation
    if not path.exists():
        return None
    try:
        block = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(block, dict):
        raise ValueError(f"{path}: not a JSON object")
    return block


def read_client_evaluation(run_dir: Path) -> dict | None:
    """``run_dir/client_evaluation.json`` (simulation: the simulated devices' own per-client
    figures, ``server.round.devices``), or None where the run wrote none."""
    path = RunDir(run_dir).client_evaluation
    if not path.exists():
        return None
    block = json.loads(path.read_text())
    if not isinstance(block, dict):
        raise ValueError(f"{path}: not a JSON object")
    return block


def render_run_dir(run_dir: Path) -> dict:
    """``fedpriv report RUN_DIR``: rebuild the report from the run's files and write it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    run = RunDir(run_dir)
    _required(run.config_file)
    config = run.config()
    rounds = read_metrics(run_dir)
    clients_reported = json.loads(_required(run.clients_reported).read_text())
    client_level = json.loads(run.client_level.read_text()) if run.client_level.exists() else None
    report = build_report(
        config=config,
        clients_reported=clients_reported,
        rounds=rounds,
        client_level=client_level,
        evaluation=read_evaluation(run_dir),
        client_evaluation=read_client_evaluation(run_dir),
    )
    write_report(run_dir, report)
    return report


def _required(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a complete fedpriv run directory")
    return path
