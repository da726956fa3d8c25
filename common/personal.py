"""What a device keeps of its own evaluations and personal model, and who may read it.

A device (``client.personal``) keeps, in its own state directory, next to its ledger:

- ``client_eval.jsonl``: one line per evaluation on its held-out part
  (``data.client_test_fraction``): ``time``, ``run_id``, ``round``, ``final`` (after the
  run's last round), ``personalize``, ``train_examples``, ``test_examples``,
  ``global_accuracy`` and ``personal_accuracy`` (null without a personal model, or with no
  held-out part). The figures are computed from the device's own data: nothing of them is
  sent; ``fedpriv device-log`` shows them to the device's owner.
- ``personal.pt``: the personal model (``client.personal``), never sent.

In simulation every device's state directory is on the machine that runs the federation,
so the runtime reads the figures from there (:func:`read_simulated`) for the report, which
says they were taken from every simulated device's disk and were not released by the
federation (:data:`SOURCE_SIMULATED`). In deployment they stay on the devices.

This module holds the file names, the line's reader and writer, and the summary the report
and the terminal show (:func:`summary`); it imports neither torch nor any client code.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

from common.storage import append_json_line, read_json_lines

EVAL_LOG = "client_eval.jsonl"
PERSONAL_MODEL = "personal.pt"

#: The report's ``evaluation.per_client`` rows, in this order (DESIGN.md).
PER_CLIENT_KEYS = ("client_id", "test_examples", "global_accuracy", "personal_accuracy")

#: Where the report's per-client figures came from (``evaluation.per_client_source``).
SOURCE_SIMULATED = (
    "Per-client figures were read by the simulation runtime from every simulated device's "
    "state directory on this machine (client_eval.jsonl); they are computed from each "
    "client's own held-out data and were not released by the federation: no DP noise, "
    "no ε. In deployment they stay on the devices (fedpriv device-log shows them there)."
)
CAVEAT_PERSONAL = (
    "Personal models (personalize={name}) are trained on each device from the global model, "
    "on the device's own training part, without DP, and never leave the device: they spend "
    "no ε towards the server or anyone who receives the global model (every ledger equals "
    "that of the same run without them), and they are as private as the device they stay on."
)


def device_directory(state_dir: str | Path, client_id: str) -> Path:
    """A client's directory in a state directory (the ledger's: ``<state_dir>/<client_id>``)."""
    return Path(state_dir) / str(client_id)


def eval_log(state_dir: str | Path, client_id: str) -> Path:
    return device_directory(state_dir, client_id) / EVAL_LOG


def record_evaluation(state_dir: str | Path, client_id: str, line: dict) -> dict:
    """Append one evaluation's line (its ``time`` added) to the device's own log."""
    line = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **line}
    append_json_line(eval_log(state_dir, client_id), line)
    return line


def read_evaluations(state_dir: str | Path, client_id: str) -> list[dict]:
    """The device's evaluation lines, in order (none: an empty list)."""
    path = eval_log(state_dir, client_id)
    return read_json_lines(path) if path.exists() else []


def read_simulated(state_dir: str | Path, run_id: str) -> list[dict]:
    """Simulation only: the last evaluation of run ``run_id`` that each simulated device under
    ``state_dir`` keeps, as the report's rows (:data:`PER_CLIENT_KEYS`), numeric ids in
    numeric order. Devices that kept none for the run are left out."""
    root = Path(state_dir)
    if not root.is_dir():
        return []
    rows = []
    for directory in root.iterdir():
        if not (directory / EVAL_LOG).is_file():
            continue
        lines = [line for line in read_json_lines(directory / EVAL_LOG) if line.get("run_id") == run_id]
        if not lines:
            continue
        last = lines[-1]
        rows.append(
            {
                "client_id": directory.name,
                "round": last.get("round"),
                **{key: last.get(key) for key in PER_CLIENT_KEYS[1:]},
            }
        )
    return sorted(
        rows, key=lambda row: (0, int(row["client_id"]), "") if row["client_id"].isdigit() else (1, 0, row["client_id"])
    )


def _stats(values: list[float]) -> dict | None:
    """Mean, 10th percentile (linear interpolation, numpy's default) and worst of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    pos = 0.1 * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    p10 = ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
    return {"mean": sum(ordered) / len(ordered), "p10": p10, "worst": ordered[0]}


def summary(rows: list[dict]) -> dict:
    """Per-client accuracy of the global and of the personal models over ``rows`` (the report's
    ``per_client``): ``clients`` counted, and for each model its mean, 10th percentile and worst
    client (null where no row has the figure). Both over the clients that have both figures
    when any has a personal one, so the two are compared on the same clients."""
    scored = [r for r in rows if r.get("global_accuracy") is not None and (r.get("test_examples") or 0) > 0]
    paired = [r for r in scored if r.get("personal_accuracy") is not None]
    same = paired if paired else scored
    return {
        "clients": len(same),
        "global": _stats([float(r["global_accuracy"]) for r in same]),
        "personal": _stats([float(r["personal_accuracy"]) for r in paired]),
    }
