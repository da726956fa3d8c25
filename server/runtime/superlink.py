"""``fedpriv simulate`` on Flower's supported simulation runtime (``simulation.runtime=superlink``):
the launcher's side. The ServerApp's side, in Flower's simulation process, is ``server.runtime.serve``.

The engine runtime (``simulation.runtime=engine``) calls ``flwr.simulation.run_simulation``
in this process; flwr 1.42 deprecates that function. This runtime runs the same job the way
``flwr run`` does since flwr 1.28, on a SuperLink that executes simulations itself:

1. This process (Hydra, resume, sweeps, ``prepare``: a bad setting still exits 2 before
   anything starts) writes the resolved config to a private folder (``mkdtemp``, mode 700)
   with an app bundle that is only a ``pyproject.toml`` naming fedpriv's ServerApp and the
   ClientApp (``simulation.client_app`` or fedpriv's), and a private ``FLWR_HOME`` whose one
   connection is that SuperLink.
2. It starts ``flower-superlink --simulation`` on 127.0.0.1 and a free port and submits the
   bundle with ``flwr run --federation-config``: ``num-supernodes`` = ``num_clients``, Ray's
   CPUs and per-client resources from ``simulation.*``. Ray is a private one on loopback
   (``RAY_ADDRESS=local``, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), whatever other Ray runs
   on the machine, unless ``federation.ray_address`` names a cluster (``RAY_ADDRESS`` of
   those processes only).
3. Flower's simulation process runs fedpriv's ServerApp, which reads the config from the
   run-config key ``fedpriv-spec`` (``server.runtime.serve``): the same round loop with the same
   resume flag and message window. Its log records go to the run's ``cli.log``; the ones
   the terminal shows (``server.runtime.terminal``) go to a file this process prints.
4. This process shows the rounds' progress from ``metrics.jsonl``, stops the SuperLink and
   the ``flwr run`` by process id, appends their logs to ``cli.log``, and prints the summary
   (``server.runtime.simulate.finish``).

Nothing outlives this process: the SuperLink and ``flwr run`` get SIGKILL when it dies
(``PR_SET_PDEATHSIG``), Flower stops its own children when the SuperLink goes, and the
ServerApp kills its process (and so its Ray) within a second of this one's death, so a
SIGKILLed run can be resumed without a leftover writing into its run directory. When a
run ends, this process kills Flower's simulation process and its Ray itself
(``_end_serverapp``) before it stops the SuperLink: Flower's own shutdown is not waited for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common.protocol import SIMULATION_ENV
from common.report.rundir import read_metrics
from common.rundir import RunDir
from common.storage import atomic_write_json  # whole or not at all: the other side polls
from server.round.loop import progress_display, round_progress
from server.runtime.serve import (
    GO,
    OUTCOME,
    SERVER,
    SPEC_KEY,
    TERMINAL,
    alive,
    kill_tree,
    started,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60
PREFIX = "fedpriv-simulate-"
#: What Flower's processes printed, kept in the private folder until ``cli.log`` gets it.
RUN_LOG, LINK_LOG = "flwr-run.log", "superlink.log"
_LOGS = (("flwr run", RUN_LOG), ("simulation SuperLink", LINK_LOG))

_PYPROJECT = """[project]
name = "fedpriv-simulate"
version = "1.0.0"
description = "fedpriv simulate on Flower's simulation runtime"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedpriv"

[tool.flwr.app.components]
serverapp = {serverapp}
clientapp = {clientapp}

[tool.flwr.app.config]
{key} = {spec}
"""


def _tool(name: str) -> str:
    """Flower's command ``name`` of the flwr this process imports: next to this Python (a venv),
    else where that flwr's installation record put its scripts, else on PATH."""
    from importlib.metadata import PackageNotFoundError, distribution

    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    try:
        flwr = distribution("flwr")
        recorded = [flwr.locate_file(f) for f in flwr.files or () if f.name == name]
    except PackageNotFoundError:
        recorded = []
    found = next((str(Path(p).resolve()) for p in recorded if Path(p).exists()), None) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable}, in flwr's installation or on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # preexec_fn: SIGKILL this child when the process that started it dies
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def federation_config(cfg: dict, backend: dict) -> str:
    """``flwr run --federation-config``: the simulation's size and Ray resources (``backend``:
    ``server.runtime.simulate.backend_config``, what the engine runtime gives ``run_simulation``)."""

    def number(value) -> str:  # Flower reads 1.0 CPUs as a float and refuses it where it needs an int
        return str(int(value)) if float(value).is_integer() else str(float(value))

    parts = [
        f"num-supernodes={int(cfg['num_clients'])}",
        f"client-resources-num-cpus={number(backend['client_resources']['num_cpus'])}",
        f"client-resources-num-gpus={number(backend['client_resources']['num_gpus'])}",
    ]
    if "num_cpus" in backend["init_args"]:  # not when joining a cluster, which owns its CPUs
        parts.append(f"init-args-num-cpus={number(backend['init_args']['num_cpus'])}")
    return " ".join(parts)


def child_env(cfg: dict, home: Path) -> dict:
    """The environment of the SuperLink, and so of Flower's simulation process and Ray's workers.

    Flower's simulation process calls ``ray.init`` with no address, which reads ``RAY_ADDRESS``
    (this process' own is never inherited): ``federation.ray_address`` to join that cluster,
    or else ``local``, so that Ray starts a private one on loopback instead of joining any
    cluster already running on the machine or named by a stale ``/tmp/ray/ray_current_cluster``
    (Flower's federation config has no key for ``ray.init``'s address; see
    ``server.runtime.simulate.backend_config``)."""
    from server.runtime.pinning import ROOT

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["FLWR_HOME"] = str(home)
    # The SuperLink starts flower-superexec and flwr-simulation by name: the same flwr's first.
    env["PATH"] = os.pathsep.join(
        [str(Path(_tool("flower-superexec")).parent), *filter(None, [os.environ.get("PATH")])]
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env[SIMULATION_ENV] = (
        "1"  # its clients are simulated: they read the run's state_dir (client/privacy/node_config.py)
    )
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # the SuperLink's own launcher: 1 s by default
    env["PYTHONUNBUFFERED"] = "1"  # their logs reach cli.log even when they are stopped
    address = (cfg.get("federation") or {}).get("ray_address")
    if address:
        env["RAY_ADDRESS"] = str(address)
    else:
        env["RAY_ADDRESS"] = "local"  # ray.init() starts a new Ray: never one already running here
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's switch to its loopback address
    return env


def absolute_paths(cfg: dict) -> dict:
    """``cfg`` with its files named from this process' working directory, which Flower's
    simulation process does not share (it runs in the private folder, where no ``common/``
    of the user's can shadow fedpriv's): ``data.path``, ``data.test_path``, and
    ``model.name_or_path`` / ``model.tokenizer`` where they name a local folder."""
    out = json.loads(json.dumps(cfg))
    for key in ("path", "test_path"):
        if out["data"].get(key):
            out["data"][key] = str(Path(str(out["data"][key])).expanduser().resolve())
    for key in ("name_or_path", "tokenizer"):
        value = out["model"].get(key)
        if value and Path(str(value)).expanduser().exists():
            out["model"][key] = str(Path(str(value)).expanduser().resolve())
    return out


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen | None, wait_s: float = 15) -> None:
    """TERM the process' session (it leads one), then KILL what is left."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Terminal:
    """Prints what the ServerApp wrote for the terminal, and the rounds' progress bar."""

    def __init__(self, run_dir: Path, lines: Path, first: int, total: int):
        self.run_dir, self.lines, self.offset, self.seen = run_dir, lines, 0, first - 1
        self.progress = progress_display()
        self.task = self.progress.add_task("training", total=total, completed=first - 1)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.poll()
        self.progress.stop()

    def poll(self) -> None:
        if self.lines.exists():
            with open(self.lines, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                self.progress.console.print(line, markup=False, highlight=False, style="")
        rounds = read_metrics(self.run_dir, missing_ok=True)  # a torn last line: that round is not done yet
        for record in rounds[self.seen :] if len(rounds) > self.seen else []:
            self.progress.update(self.task, completed=record["round"], description=round_progress(record))
        self.seen = max(self.seen, len(rounds))


def run_on_superlink(
    cfg: dict,
    run_dir: Path,
    *,
    resume: bool,
    window: int | None,
    client_app: str,
    backend: dict,
    threads: int | None,
    verbose: bool,
    check: Callable[[], object],
) -> None:
    """Run the job on a private simulation SuperLink; raises when the ServerApp failed.

    ``backend``: Ray's settings (``server.runtime.simulate.backend_config``); ``threads``: the ServerApp's
    torch threads (``server.runtime.simulate.server_threads``). ``check`` (``server.round.loop.prepare``) runs
    here while Flower starts; the ServerApp begins only once it passed (the ``go`` file), and
    what it raises (a ``ConfigError``) stops everything and is raised again."""
    sweep_orphans()
    spec = {
        "cfg": absolute_paths(cfg),
        "run_dir": str(run_dir),
        "resume": resume,
        "window": window,
        "watch_pid": os.getpid(),
        "watch_start": started(os.getpid()),
        "verbose": verbose,
        "threads": threads,
    }
    work, port = _private_folder(spec, client_app)
    env = child_env(cfg, work / "flwr")
    first = len(read_metrics(run_dir, missing_ok=True)) + 1 if resume else 1
    link = run = None
    try:
        link = _start_superlink(work, port, env)
        run = _background(
            [
                _tool("flwr"),
                "run",
                str(work / "app"),
                "local",
                "--stream",
                "--federation-config",
                federation_config(cfg, backend),
            ],
            work / RUN_LOG,
            work,
            env,
        )
        try:
            check()
        except BaseException:
            atomic_write_json(work / GO, {"go": False})
            raise
        atomic_write_json(work / GO, {"go": True})
        with _Terminal(run_dir, work / TERMINAL, first, int(cfg["rounds"])) as terminal:
            # Once the ServerApp wrote its outcome, the report and every ledger are on disk:
            # what Flower still does (shutting Ray down, ending the stream) is not waited for.
            while run.poll() is None and not (work / OUTCOME).exists():
                terminal.poll()
                time.sleep(0.3)
    finally:
        outcome, said = _finish(work, run, link)
    if outcome is None:
        raise RuntimeError(
            f"the simulation ended without its ServerApp's outcome (cli.log has its logs); flwr run said:\n{said}"
        )
    if not outcome["ok"]:
        raise RuntimeError(f"the ServerApp failed: {outcome['error']}")


def _private_folder(spec: dict, client_app: str) -> tuple[Path, int]:
    """(the run's private folder, the SuperLink's port): the ServerApp's spec, the app bundle
    that names it, and Flower's home with the local SuperLink's connection."""
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    home, app = work / "flwr", work / "app"
    home.mkdir()
    app.mkdir()
    port = _free_port()
    (work / "spec.json").write_text(json.dumps({**spec, "work": str(work)}))
    (app / "pyproject.toml").write_text(
        _PYPROJECT.format(
            serverapp=json.dumps("server.app:app"),
            clientapp=json.dumps(client_app),
            key=json.dumps(SPEC_KEY),
            spec=json.dumps(str(work / "spec.json")),
        )
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    return work, port


def _background(argv: list[str], output: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """A Flower process of this run: its own session, its output to ``output``, ended with this one."""
    with open(output, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _start_superlink(work: Path, port: int, env: dict) -> subprocess.Popen:
    """The private simulation SuperLink on 127.0.0.1, once it answers."""
    from server.runtime.terminal import to_log_file

    link = _background(
        [
            _tool("flower-superlink"),
            "--simulation",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(work / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ],
        work / LINK_LOG,
        work,
        env,
    )
    to_log_file(log, logging.INFO, f"simulation SuperLink pid {link.pid} on 127.0.0.1:{port}, private folder {work}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(port):
        if link.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the simulation SuperLink did not start:\n{(work / LINK_LOG).read_text()[-2000:]}")
        time.sleep(0.2)
    return link


def _finish(work: Path, run: subprocess.Popen | None, link: subprocess.Popen | None) -> tuple[dict | None, str]:
    """Stop what the run started, keep Flower's output in cli.log, remove the private folder;
    (the ServerApp's outcome or None, the end of what `flwr run` said)."""
    from server.runtime.terminal import to_log_file

    _end_serverapp(work)
    _stop(run)
    _stop(link)
    outcome = json.loads((work / OUTCOME).read_text()) if (work / OUTCOME).exists() else None
    run_log = work / RUN_LOG
    said = run_log.read_text(errors="replace").strip()[-1000:] if run_log.exists() else ""
    for name, text in _flower_outputs(work):
        to_log_file(log, logging.INFO, f"--- {name} output ---\n{text}")
    shutil.rmtree(work, ignore_errors=True)
    return outcome, said


def sweep_orphans() -> None:
    """Remove the private folders of runs whose ``fedpriv simulate`` was killed (a SIGKILL leaves
    it no time to), after appending what Flower's processes printed to that run's ``cli.log``.

    Only this user's folders whose watched process is gone (or its pid reused) are touched; a
    folder is renamed before it is read, so of two runs sweeping at once only one takes it.
    The folder holds the run's resolved config; it should not wait in /tmp for a reboot."""
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            if folder.is_symlink() or folder.lstat().st_uid != os.getuid():
                continue  # another user's, or a link someone placed: never followed
            if folder.suffix == ".swept":  # its sweeper was killed in turn
                if time.time() - folder.stat().st_ctime > 60:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            spec = json.loads((folder / "spec.json").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or a run that is writing its spec right now
        if alive(int(spec["watch_pid"]), spec.get("watch_start")):
            continue
        claimed = folder.with_name(folder.name + ".swept")
        try:
            folder.rename(claimed)
        except OSError:
            continue  # another run took it
        cli_log = RunDir(spec["run_dir"]).cli_log if spec.get("run_dir") else None
        try:
            if cli_log and cli_log.is_file():
                with open(cli_log, "a", encoding="utf-8") as out:
                    for name, text in _flower_outputs(claimed):
                        out.write(f"--- {name} output (the run was killed; kept by the next run) ---\n{text}\n")
        except OSError:
            pass  # the run directory is gone or not ours to write: the folder goes all the same
        shutil.rmtree(claimed, ignore_errors=True)


def _flower_outputs(work: Path) -> list[tuple[str, str]]:
    """What Flower's processes printed into a private folder, by process, as ``cli.log`` takes it."""
    return [(name, (work / path).read_text(errors="replace")) for name, path in _LOGS if (work / path).exists()]


def _end_serverapp(work: Path) -> None:
    """SIGKILL Flower's simulation process and everything below it (its Ray), if it still runs.

    Once the ServerApp is done (its outcome written, or this process giving up), nothing of
    fedpriv's is left to write there, and Flower's own shutdown of it is slow and can hang
    (BENCHMARKS.md, "fedpriv simulate on Flower's simulation runtime")."""
    if not (work / SERVER).exists():
        return
    server = json.loads((work / SERVER).read_text())
    if alive(server["pid"], server["start"]):
        kill_tree(server["pid"])
