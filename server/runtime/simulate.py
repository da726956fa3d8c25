"""``fedpriv simulate``: N simulated clients on this machine, a Hydra main (overrides, ``-m`` sweeps).

It coordinates, so it lives with the server; it loads the ClientApp by its component string
(``server.runtime.pinning.CLIENT_APP``, as ``flwr run`` does), never by importing client code.
Two runtimes (``simulation.runtime``): ``superlink`` (Flower's supported one,
``server.runtime.superlink``) and ``engine`` (``flwr.simulation.run_simulation`` in this process).
A bad setting exits 2 with one line naming it; the run's summary table is printed last.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from common.rundir import RunDir
from server.runtime.pinning import CLIENT_APP, ClientAppRef

log = logging.getLogger("fedpriv")

#: Hydra's job name, after which it names the run's log: ``cli.log``. Hydra would take the name
#: of the main's module, which was ``server/cli.py``; the ServerApp and the sweep write there too.
JOB_NAME = "cli"


def main(argv: list[str], *, verbose: bool = False) -> None:
    """The Hydra main over ``argv`` (overrides, ``-m``, ``--help``); ``verbose``: ``fedpriv -v``."""
    import hydra

    from server.runtime.compose import conf_path

    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and resume[0] not in ("", "null"):
        # Write into the resumed run's directory and keep its original .hydra/config.yaml.
        argv = [*argv, f"hydra.run.dir={Path(resume[0]).resolve()}", "hydra.output_subdir=null"]
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv = [*argv, f"hydra.job.name={JOB_NAME}"]
    sys.argv = ["fedpriv simulate", *argv]

    sweeps: list[Path] = []  # the multirun directory, once a -m job has run

    def task(cfg_node) -> None:
        sweep = sweep_dir()
        if sweep is not None and sweep not in sweeps:
            sweeps.append(sweep)
        simulate(cfg_node, verbose=verbose, sweep=sweep)

    hydra.main(config_path=conf_path(), config_name="config", version_base="1.3")(task)()
    if sweeps:  # after Hydra's multirun: every job has its report
        from server.tracking.sweep import finish_sweep

        finish_sweep(sweeps[0])


def sweep_dir() -> Path | None:
    """The Hydra multirun directory of the job now running; None outside a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).resolve() if hydra_cfg.mode == RunMode.MULTIRUN else None


def backend_config(cfg: dict) -> dict:
    """Flower's Ray backend settings: a private Ray on loopback, or an existing cluster.

    Without ``federation.ray_address`` fedpriv starts a Ray of its own whatever else runs on
    the machine: ``address="local"``, since ``ray.init()`` with no address joins any cluster
    it finds (a running ``ray start --head``, or the ``/tmp/ray/ray_current_cluster`` a dead
    one left), which then refuses ``num_cpus`` (Flower's exit code 700). The SuperLink runtime
    cannot pass an address through Flower's federation config; its processes get
    ``RAY_ADDRESS=local`` instead (``server.runtime.superlink.child_env``).

    With ``federation.ray_address`` (``auto``, ``ray://head:10001``, ``head:6379``)
    fedpriv joins that cluster instead of starting one: the cluster owns the CPUs
    and GPUs, so only per-client resources are given (``num_cpus`` for ``ray.init``
    would be refused when connecting). Every node of the cluster needs fedpriv
    installed (same code, same Python) and, for ``state_dir``, a path that all
    workers share, or each client's ledger lands on whichever node ran it.
    """
    sim = cfg["simulation"]
    resources = {"num_cpus": float(sim["cpus_per_client"]), "num_gpus": float(sim["gpus_per_client"])}
    address = (cfg.get("federation") or {}).get("ray_address")
    if address:
        # Passed to ray.init only: setting RAY_ADDRESS here would leak into every later
        # Ray start of this process and of its children (a test suite's, say).
        return {"client_resources": resources, "init_args": {"address": str(address), "include_dashboard": False}}
    return {
        "client_resources": resources,
        "init_args": {
            "address": "local",  # a new Ray, never one already running here
            "num_cpus": int(sim["num_cpus"] or os.cpu_count() or 1),
            "include_dashboard": False,
            # With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set where Ray starts): loopback only.
            "_node_ip_address": "127.0.0.1",
        },
    }


def server_threads(cfg: dict) -> int | None:
    """torch intra-op threads for the simulate process itself, or None to leave torch's default.

    ``simulation.num_cpus`` is the CPU budget of the whole simulation (Ray's total). The
    server's own torch work (tokenising, central evaluation every round) runs in this
    process, outside Ray's accounting, so it is capped to the same budget: one thread per
    core on a shared machine made central evaluation slower, not faster (BENCHMARKS.md,
    sim_overhead). Joining a cluster (``federation.ray_address``) leaves it alone.
    """
    budget = cfg["simulation"].get("num_cpus")
    if not budget or (cfg.get("federation") or {}).get("ray_address"):
        return None
    return max(1, int(budget))


def message_window(cfg: dict) -> int | None:
    """How many of a round's messages fedpriv simulate keeps in flight (server.round.dispatch).

    ``simulation.in_flight_per_worker`` times the number of client workers Ray runs at
    once (``simulation.num_cpus`` over ``cpus_per_client``); None (all at once) when the
    setting is null or absent (a run resumed from an older config), or when fedpriv joins
    a cluster (``federation.ray_address``), whose size it does not know.
    """
    sim = cfg["simulation"]
    per_worker = sim["in_flight_per_worker"]
    if per_worker is None or (cfg.get("federation") or {}).get("ray_address"):
        return None
    cpus = int(sim["num_cpus"] or os.cpu_count() or 1)
    per_client = float(sim["cpus_per_client"])
    workers = max(1, int(cpus / per_client)) if per_client > 0 else cpus
    return max(1, int(per_worker) * workers)


def simulate(cfg_node, *, verbose: bool = False, sweep: Path | None = None) -> None:
    """Hydra task: validate, then run the federation on Flower's simulation runtime (``simulation.runtime``).

    ``sweep``: the multirun directory of a ``-m`` job, whose MLflow run goes under the sweep's."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations
    from common.errors import ConfigError
    from server.tracking.sweep import link_job

    try:
        cfg, run_dir, prepared = _checked(cfg_node)
        if sweep is not None:
            link_job(cfg, run_dir, sweep, name=job_name(run_dir))
    except ConfigError as err:
        configuration_error(err)
    errors: list[BaseException] = []
    if cfg["simulation"]["runtime"] == "superlink":
        _on_superlink(cfg, run_dir, verbose=verbose)
    else:
        _on_engine(cfg, run_dir, prepared, errors, verbose=verbose)
    if errors:
        raise errors[0]
    if not RunDir(run_dir).report_json.exists():
        raise RuntimeError("the simulation ended without a privacy report; see the log above")
    code = finish(run_dir)
    if code:  # not sys.exit(0): that would end a -m sweep after its first job
        sys.exit(code)


def job_name(run_dir: Path) -> str:
    """A sweep job's name for its tracker: its number and the overrides that make it this job."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().job.override_dirname
    return f"{run_dir.name}: {overrides}" if overrides else run_dir.name


def _checked(cfg_node):
    """(config, run directory, prepared or None): the resolved config, validated; raises ConfigError.

    The engine runtime prepares here, so a bad setting stops before Ray starts; the
    SuperLink runtime prepares while the SuperLink starts (``run_on_superlink``'s check)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from common.config.validate import validate
    from server.round.loop import prepare

    if cfg_node.get("resume"):
        cfg, run_dir = resume_config(cfg_node, HydraConfig.get().overrides.task)
    else:
        cfg = OmegaConf.to_container(cfg_node, resolve=True)
        cfg["state_dir"] = str(Path(cfg["state_dir"]).resolve())
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    threads = server_threads(cfg)
    if threads is not None:
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), threads))
    validate(cfg)  # the config alone; with the data and the model below, or while the SuperLink starts
    if cfg["tracking"]["name"] == "mlflow":
        from server.tracking.mlflow_client import require

        require()  # a missing client is a setting's error, before any training
    on_superlink = cfg["simulation"]["runtime"] == "superlink"
    return cfg, run_dir, None if on_superlink else prepare(cfg)


def _on_superlink(cfg: dict, run_dir: Path, *, verbose: bool) -> None:
    """Flower's supported simulation runtime (server.runtime.superlink)."""
    from common.errors import ConfigError
    from server.round.loop import prepare
    from server.runtime.superlink import run_on_superlink
    from server.runtime.terminal import quiet_terminal

    try:
        with quiet_terminal(verbose=verbose):
            # The ServerApp, in Flower's simulation process, waits until prepare has passed here.
            run_on_superlink(
                cfg,
                run_dir,
                resume=bool(cfg.get("resume")),
                window=message_window(cfg),
                client_app=cfg["simulation"].get("client_app") or CLIENT_APP,
                backend=backend_config(cfg),
                threads=server_threads(cfg),
                verbose=verbose,
                check=lambda: prepare(cfg),
            )
    except ConfigError as err:
        configuration_error(err)


def _on_engine(cfg: dict, run_dir: Path, prepared, errors: list[BaseException], *, verbose: bool) -> None:
    """``flwr.simulation.run_simulation`` in this process; what the ServerApp raised lands in ``errors``."""
    from flwr.simulation import run_simulation

    from common.protocol import simulation_env
    from server.runtime.serverapp import make_app
    from server.runtime.terminal import quiet_terminal

    # Ray's workers inherit the marker; a Ray of fedpriv's own listens on loopback only.
    loopback = {} if (cfg.get("federation") or {}).get("ray_address") else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with quiet_terminal(verbose=verbose), simulation_env(**loopback):
        run_simulation(
            server_app=make_app(prepared, run_dir, errors, resume=bool(cfg.get("resume")), window=message_window(cfg)),
            client_app=ClientAppRef(cfg["simulation"].get("client_app") or CLIENT_APP),
            num_supernodes=int(cfg["num_clients"]),
            backend_config=backend_config(cfg),
        )


def configuration_error(err) -> None:
    print(f"fedpriv: configuration error: {err}", file=sys.stderr)
    sys.exit(2)  # SystemExit passes through Hydra's error handler; exceptions do not


def finish(run_dir: Path) -> int:
    """Print the run's summary table, last; 1 when no client trained and not because all declined."""
    from rich.console import Console

    from server.runtime.summary import RunSummary
    from server.runtime.terminal import to_log_file

    summary = RunSummary.of(run_dir)
    failure, note = summary.failure(), summary.note()
    for label, value in summary.rows():
        to_log_file(log, logging.INFO, f"summary: {label}: {value}")
    if note:
        to_log_file(log, logging.WARNING, note)
        print(note)
    Console().print(summary.table())
    if failure:
        to_log_file(log, logging.ERROR, failure)
        print(failure, file=sys.stderr)
        return 1
    return 0


def resume_config(cfg_node, task_overrides) -> tuple[dict, Path]:
    """The stored config of the run to resume, brought up to date (``common.config.upgrade``);
    only ``rounds`` may change (DESIGN.md)."""
    from common.errors import ConfigError

    run_dir = Path(str(cfg_node.resume)).resolve()
    run = RunDir(run_dir)
    if not run.is_run():
        raise ConfigError("resume", f"{run.config_file} does not exist: not a fedpriv run directory")
    refused = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "rounds")]
    if refused:
        raise ConfigError(
            "resume",
            f"a resumed run keeps its stored configuration; refused overrides: {refused} (only rounds may change)",
        )
    cfg = run.config()
    if any(o.split("=", 1)[0] == "rounds" for o in task_overrides):
        cfg["rounds"] = int(cfg_node.rounds)
    cfg["resume"] = str(run_dir)
    return cfg, run_dir
