"""The ServerApp's side of ``fedpriv simulate`` on a SuperLink (``server.runtime.superlink``
launches it), and what every ServerApp does with a run's end.

Flower's simulation process runs fedpriv's ServerApp (``server.app``), which reads the spec a
``fedpriv simulate`` wrote (``load_spec``), waits for its go-ahead, runs the round loop with
its log in the run's ``cli.log`` and writes its outcome beside the spec (``serve``). The two
sides share nothing but the private folder's files named here, and the process helpers below
(the watchdog here, the end of a run there).

``federate`` is the round loop plus the run's end, in every runtime (``server.app``): the
explanation page of a few test inputs, drawn from the model, tokenizer and test texts the
loop still holds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from common.rundir import RunDir
from common.storage import (
    atomic_write_json,  # whole or not at all: the other side polls
)

log = logging.getLogger(__name__)

#: The run-config key of the ServerApp's spec (server.app).
SPEC_KEY = "fedpriv-spec"
#: Beside the spec: the go-ahead once the config passed, the ServerApp's outcome, the lines the terminal shows,
#: and which process runs the ServerApp (Flower's simulation process).
GO, OUTCOME, TERMINAL, SERVER = "go.json", "outcome.json", "terminal.log", "serverapp.json"


def federate(grid, prepared, run_dir: Path, **loop_options) -> dict:
    """Run (or continue) the federation, then write its explanation page; returns the privacy report.

    ``loop_options``: ``server.round.loop.run_rounds``' (resume, window, progress_bar). With
    ``tracking=mlflow`` the run's tracker (``server.tracking.tracker``) observes every round,
    catches up first on a resumed run's rounds it lacks, and stores the report at the end."""
    from server.round.loop import run_rounds

    tracker = _tracker(prepared.cfg, run_dir, resume=bool(loop_options.get("resume")))
    try:
        end = run_rounds(grid, prepared, run_dir, observer=tracker.round if tracker else None, **loop_options)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    explain_run_end(end)
    if tracker is not None:
        tracker.finish()
    return end.report


def _tracker(cfg: dict, run_dir: Path, *, resume: bool):
    """The run's tracker, None with ``tracking=none``; none either for a fresh run into a directory
    that holds one (the loop refuses it, and that run's MLflow run is not this one's)."""
    from server.tracking.tracker import open_tracker

    if not resume and RunDir(run_dir).metrics.exists():
        return None
    tracker = open_tracker(cfg, run_dir)
    if tracker is not None and resume:
        tracker.catch_up()
    return tracker


def explain_run_end(end) -> None:
    """What the released model attends to on ``evaluation.explain_inputs`` of the server's test
    inputs (server.release.explain_page), from the run's end in memory (``RunEnd``).

    A page that cannot be drawn is a warning, never a failed run: the model and the report are written."""
    cfg = end.prepared.cfg
    count = int(cfg["evaluation"]["explain_inputs"])
    if count <= 0 or cfg["task"] == "token_classification":  # explain reads sequence classifiers only
        return
    from server.release.explain_page import write_run_explanations
    from server.release.released import Released

    try:
        page = write_run_explanations(end.run_dir, Released.at_end(end), count=count)
        log.info("what the model attends to on %d test inputs: %s", count, page)
    except Exception:
        log.warning("could not write the test inputs' explanations in %s", end.run_dir, exc_info=True)


def load_spec(path: str) -> dict:
    """The spec a ``fedpriv simulate`` wrote, refused unless it is in a private folder of this user."""
    spec = Path(path)
    folder = spec.parent.stat()
    if folder.st_uid != os.getuid() or folder.st_mode & 0o077:
        raise PermissionError(f"{SPEC_KEY} must be in a private folder of this user (mkdtemp's)")
    return json.loads(spec.read_text())


def serve(spec: dict, grid) -> None:
    """The ServerApp's side: run the spec's job, its log in the run's cli.log, its outcome beside it."""
    from server.round.loop import prepare

    work, run_dir, cfg = Path(spec["work"]), Path(spec["run_dir"]), spec["cfg"]
    atomic_write_json(work / SERVER, {"pid": os.getpid(), "start": started(os.getpid())})
    watch(int(spec["watch_pid"]), spec.get("watch_start"))
    waiting = time.monotonic()
    while not (work / GO).exists():  # `fedpriv simulate` checks the data and the model meanwhile
        time.sleep(0.1)
    if not json.loads((work / GO).read_text())["go"]:
        return  # refused there, with the setting's name; nothing was written here
    run_dir.mkdir(parents=True, exist_ok=True)
    waited = time.monotonic() - waiting
    restore = _log_to_run(run_dir, work, verbose=spec["verbose"])
    log.info("ServerApp in Flower's simulation process %d (waited %.1f s for the config check)", os.getpid(), waited)
    try:
        threads = spec["threads"]
        if threads is not None:
            import torch

            torch.set_num_threads(min(torch.get_num_threads(), threads))
        federate(grid, prepare(cfg), run_dir, resume=bool(spec["resume"]), window=spec["window"], progress_bar=False)
        outcome = {"ok": True}
    except BaseException as err:
        log.exception("the ServerApp failed")
        outcome = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
        raise
    finally:
        atomic_write_json(work / OUTCOME, outcome)
        restore()


def _log_to_run(run_dir: Path, work: Path, *, verbose: bool):
    """Send the root logger to the run's ``cli.log`` and to the lines ``fedpriv simulate`` prints;
    returns the function that undoes it."""
    from server.runtime.terminal import is_noise

    root = logging.getLogger()
    to_file = logging.FileHandler(RunDir(run_dir).cli_log)
    to_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    to_terminal = logging.FileHandler(work / TERMINAL)
    to_terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    to_terminal.addFilter(lambda record: not is_noise(record))
    to_terminal.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    level = root.level
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Flower's log uploads, one request per 0.2 s
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    logging.captureWarnings(True)

    def restore() -> None:
        logging.captureWarnings(False)
        for handler in (to_file, to_terminal):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)

    return restore


# --- processes, on both sides of the boundary -------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def started(pid: int) -> str | None:
    """The process' start time (/proc), which a reused pid does not share; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def kill_tree(pid: int) -> None:
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def alive(pid: int, start: str | None) -> bool:
    """Whether the process that had ``pid`` and started at ``start`` still runs (a reused pid does not)."""
    if start is not None:
        return started(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def watch(pid: int, start: str | None) -> None:
    """When ``pid`` (the ``fedpriv simulate``) is gone, SIGKILL every process below this one
    (Ray's raylet, its workers and agents), then this one: Ray's agents outlive their driver
    by tens of seconds otherwise."""

    def watching() -> None:
        while alive(pid, start):
            time.sleep(0.5)
        kill_tree(os.getpid())

    threading.Thread(target=watching, name="fedpriv-watch-parent", daemon=True).start()
