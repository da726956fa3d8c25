"""The ``fedpriv`` command: ``fedpriv simulate [HYDRA_OVERRIDES...]``, ``fedpriv report RUN_DIR``,
``fedpriv audit``, ``fedpriv export`` and ``fedpriv predict``.

``simulate`` coordinates, so it lives with the server; it loads the ClientApp by its
component string (``server.runtime.pinning.CLIENT_APP``, as ``flwr run`` does), never by
importing client code. The audit trains like a client, so its runner is client code too:
the CLI finds it through the ``fedpriv.commands`` entry points (packaging metadata,
pyproject's ``[project.entry-points."fedpriv.commands"]``), not by a name in ``server/``.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from pathlib import Path

from server.runtime.pinning import CLIENT_APP, ROOT, ClientAppRef, load, pin

USAGE = """usage: fedpriv [-v] simulate [HYDRA_OVERRIDES ...]   run N simulated clients (Hydra; -m for sweeps;
                                                -v: the full logs on the terminal, not only warnings)
       fedpriv report RUN_DIR                   re-render a run's privacy report
       fedpriv audit [HYDRA_OVERRIDES ...]      one-run empirical privacy audit (audit.* settings;
                                                audit=power: the preset with measured power)
       fedpriv device-log STATE_DIR [--client ID] [--html FILE]
                                                what left a device and what it cost (its transparency log)
       fedpriv explain RUN_DIR --text T [--text T ...] [--out FILE.html] [--round N]
                                                the released model's predictions and attention on T
       fedpriv export RUN_DIR OUT [--round N] [--merge]   the released model as a Hugging Face
                                                directory with a model card stating the run's epsilon
       fedpriv predict MODEL_OR_RUN (--text T [--text T ...] | --file F.csv [--text-column text])"""

#: The entry-point group of the commands whose code is not the server's (``audit``: ``run_audit``).
COMMANDS = "fedpriv.commands"

log = logging.getLogger("fedpriv")

#: ``fedpriv -v``: the terminal shows every log line and third-party message (server.runtime.terminal).
VERBOSE_FLAGS = ("-v", "--verbose")
_verbose = False


def _offline_env() -> None:
    # No hub is reachable; fail fast instead of retrying downloads. Ray workers inherit these.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # A privacy tool does not phone home by default (Flower's usage events); opt in by
    # setting FLWR_TELEMETRY_ENABLED=1.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def load_command(name: str):
    """The object the ``fedpriv.commands`` entry point ``name`` names, loaded from this tree."""
    from importlib.metadata import entry_points

    found = entry_points(group=COMMANDS, name=name)
    return load(next(iter(found)).value if found else _checkout_entry_point(name))


def _checkout_entry_point(name: str) -> str:
    """The entry point from the checkout's own pyproject, for metadata that predates it.

    Installed metadata is written at install time: an editable install made before the
    entry point existed, or this tree run through PYTHONPATH beside another tree's
    install, lacks it until reinstalled. Only then, and only in a checkout (pyproject
    beside the packages; a wheel has none), is the declaration read from the source.
    """
    pyproject = ROOT / "pyproject.toml"
    table = {}
    if pyproject.is_file():
        with open(pyproject, "rb") as fh:
            table = tomllib.load(fh).get("project", {}).get("entry-points", {}).get(COMMANDS, {})
    if name not in table:
        raise LookupError(f"no {COMMANDS!r} entry point {name!r}: reinstall fedpriv")
    return table[name]


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
            "_node_ip_address": "127.0.0.1",  # with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set where Ray starts): loopback only
        },
    }


def server_threads(cfg: dict) -> int | None:
    """torch intra-op threads for the simulate process itself, or None to leave torch's default.

    ``simulation.num_cpus`` is the CPU budget of the whole simulation (Ray's total). The
    server's own torch work (tokenising, central evaluation every round) runs in this
    process, outside Ray's accounting, so it is capped to the same budget: with the
    default one thread per core, central evaluation of MiniLM on a machine shared with
    other jobs measured 11-23 s on 2 threads against 7-8 s on 1 (BENCHMARKS.md,
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
    per_worker = sim.get("in_flight_per_worker")
    if per_worker is None or (cfg.get("federation") or {}).get("ray_address"):
        return None
    cpus = int(sim["num_cpus"] or os.cpu_count() or 1)
    per_client = float(sim["cpus_per_client"])
    workers = max(1, int(cpus / per_client)) if per_client > 0 else cpus
    return max(1, int(per_worker) * workers)


def simulate(cfg_node) -> None:
    """Hydra task: validate, then run the federation on Flower's simulation runtime (``simulation.runtime``)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from common.config.validate import validate
    from common.errors import ConfigError
    from server.app import make_app
    from server.round.loop import prepare
    from server.runtime.terminal import quiet_terminal

    try:
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
        on_superlink = cfg["simulation"].get("runtime", "engine") == "superlink"
        validate(cfg)  # the config alone; with the data and the model below, or while the SuperLink starts
        prepared = None if on_superlink else prepare(cfg)  # a bad setting stops here, before Ray starts
    except ConfigError as err:
        configuration_error(err)

    errors: list[BaseException] = []
    client_app = cfg["simulation"].get("client_app") or CLIENT_APP
    if on_superlink:  # Flower's supported simulation runtime (server.runtime.superlink)
        from server.runtime.superlink import run_on_superlink

        try:
            with quiet_terminal(verbose=_verbose):
                # The ServerApp, in Flower's simulation process, waits until prepare has passed here.
                run_on_superlink(cfg, run_dir, resume=bool(cfg.get("resume")), window=message_window(cfg),
                                 client_app=client_app, backend=backend_config(cfg), threads=threads,
                                 verbose=_verbose, check=lambda: prepare(cfg))
        except ConfigError as err:
            configuration_error(err)
    else:
        from flwr.simulation import run_simulation

        from common.protocol import simulation_env

        # Ray's workers inherit the marker; a Ray of fedpriv's own listens on loopback only.
        loopback = {} if (cfg.get("federation") or {}).get("ray_address") else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        with quiet_terminal(verbose=_verbose), simulation_env(**loopback):
            run_simulation(
                server_app=make_app(prepared, run_dir, errors, resume=bool(cfg.get("resume")),
                                    window=message_window(cfg)),
                client_app=ClientAppRef(client_app),
                num_supernodes=int(cfg["num_clients"]),
                backend_config=backend_config(cfg),
            )
    if errors:
        raise errors[0]
    if not (run_dir / "privacy_report.json").exists():
        raise RuntimeError("the simulation ended without a privacy report; see the log above")
    code = finish(run_dir)
    if code:  # not sys.exit(0): that would end a -m sweep after its first job
        sys.exit(code)


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
    """The stored config of the run to resume; only ``rounds`` may change (DESIGN.md)."""
    from omegaconf import OmegaConf

    from common.errors import ConfigError

    run_dir = Path(str(cfg_node.resume)).resolve()
    stored_path = run_dir / ".hydra" / "config.yaml"
    if not stored_path.exists():
        raise ConfigError("resume", f"{stored_path} does not exist: not a fedpriv run directory")
    refused = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "rounds")]
    if refused:
        raise ConfigError("resume", f"a resumed run keeps its stored configuration; refused overrides: {refused} "
                                    "(only rounds may change)")
    cfg = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True)
    if any(o.split("=", 1)[0] == "rounds" for o in task_overrides):
        cfg["rounds"] = int(cfg_node.rounds)
    cfg["resume"] = str(run_dir)
    return cfg, run_dir


def _hydra_simulate(argv: list[str]) -> None:
    import hydra

    from server.runtime.compose import conf_path

    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and resume[0] not in ("", "null"):
        # Write into the resumed run's directory and keep its original .hydra/config.yaml.
        argv = [*argv, f"hydra.run.dir={Path(resume[0]).resolve()}", "hydra.output_subdir=null"]
    sys.argv = ["fedpriv simulate", *argv]
    hydra.main(config_path=conf_path(), config_name="config", version_base="1.3")(simulate)()


def report(argv: list[str]) -> int:
    from common.report import render_run_dir

    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    report = render_run_dir(Path(argv[0]))
    print(f"fedpriv: report re-rendered in {Path(argv[0]) / 'privacy_report.md'} "
          f"({len(report['sample_level']['clients'])} clients)")
    return 0


def audit(argv: list[str]) -> int:
    """Canaries among held-out examples, train once, print and write the ε lower bound and the verdict.

    Every verdict line states the audit's power (the bound all guesses right would
    give). ``exceeds`` (bound above the accounted ε) exits 1; ``inconclusive`` (the power
    is below the accounted ε: the audit could not have confirmed it) and ``consistent``
    exit 0. ``audit=power`` selects the preset with measured power (conf/audit/power.yaml).
    """
    import json

    from common.privacy.audit_bounds import CONSISTENT, EXCEEDS, verdict
    from server.runtime.compose import compose_config

    cfg, run_dir = compose_config(argv)
    from common.config.validate import validate

    validate(cfg)
    a = cfg["audit"]
    run_audit = load_command("audit")
    result = run_audit(cfg, canaries=int(a["canaries"]), guesses=int(a["guesses"]), client=int(a["client"]),
                       noise=bool(a["noise"]), confidence=float(a["confidence"]))
    bound, power = float(result["epsilon_lower_bound"]), float(result["max_detectable_epsilon"])
    accounted = float(result["epsilon_accounted"])
    result["verdict"] = found = verdict(bound, power, accounted)  # one rule, whoever ran the audit
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "audit.json"
    out.write_text(json.dumps({"config": cfg, "audit": result}, indent=2, default=str) + "\n")
    if found == EXCEEDS:
        says = f"EXCEEDS: the bound {bound:.3f} is above the accounted epsilon {accounted:.3f}"
    elif found == CONSISTENT:
        says = (f"consistent: the bound stays within the accounted epsilon {accounted:.3f}, "
                f"which these guesses could have shown (up to {power:.3f})")
    elif accounted == float("inf"):  # sigma = 0: nothing bounds epsilon, the bound is the power check
        says = "inconclusive: no noise, so no finite accounted epsilon to check (the bound is the power check)"
    else:
        says = (f"inconclusive: even all {result['guesses']} guesses right would show at most {power:.3f}, "
                f"below the accounted epsilon {accounted:.3f}; checking it needs more guesses")
    print(f"fedpriv audit: {result['correct']}/{result['guesses']} canary guesses right "
          f"({result['canaries']} canaries) -> epsilon >= {bound:.3f} at {result['confidence']:.0%} confidence; "
          f"power: {result['guesses']} guesses can show at most {power:.3f}; {says}; {out}")
    return 1 if found == EXCEEDS else 0


def explain(argv: list[str]) -> int:
    """Predicted class per text, and the page with attention maps and token shading."""
    import argparse

    from server.round.checkpoint import CheckpointError
    from server.release.explain_page import CLI_PAGE, write_explanations
    from server.release.released import load_released

    parser = argparse.ArgumentParser(prog="fedpriv explain", description="What the released global model "
                                     "of a run predicts for the given texts and what it attends to; no client data.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--text", action="append", required=True, help="a text to explain (repeatable)")
    parser.add_argument("--out", type=Path, help=f"the HTML page (default: RUN_DIR/{CLI_PAGE})")
    parser.add_argument("--round", type=int, dest="server_round", help="that round's model (default: the last)")
    args = parser.parse_args(argv)
    try:
        released = load_released(args.run_dir, args.server_round)
    except CheckpointError as err:
        print(f"fedpriv: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / CLI_PAGE
    for found in write_explanations(released, args.text, out, source="given on the command line"):
        print(f"{found.label} ({found.probability:.1%}): {found.text}")
    print(f"fedpriv: explanations of round {released.server_round}'s model in {out}")
    return 0


def export_command(argv: list[str]) -> int:
    """``fedpriv export RUN_DIR OUT [--round N] [--merge]`` (server.release.export)."""
    import argparse

    from server.round.checkpoint import CheckpointError
    from server.release.export import ExportError, export

    parser = argparse.ArgumentParser(prog="fedpriv export", description="export a run's released model")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("out", metavar="OUT")
    parser.add_argument("--round", type=int, default=None, help="the round's checkpoint (default: the last)")
    parser.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the encoder")
    args = parser.parse_args(argv)
    try:
        done = export(args.run_dir, args.out, server_round=args.round, merge=args.merge)
    except (ExportError, CheckpointError) as err:
        print(f"fedpriv export: {err}", file=sys.stderr)
        return 2
    merged = " (LoRA adapter merged into the encoder)" if done.merged else ""
    print(f"fedpriv: round {done.meta['round']} exported to {done.out} as a {done.layout} model{merged}; "
          f"model card {done.out / 'README.md'}")
    return 0


def predict_command(argv: list[str]) -> int:
    """``fedpriv predict MODEL_OR_RUN --text T ... | --file F.csv [--text-column C]`` (server.release.predict)."""
    import argparse
    import csv

    from server.round.checkpoint import CheckpointError
    from server.release.export import ExportError
    from server.release.predict import predictor, read_texts

    parser = argparse.ArgumentParser(prog="fedpriv predict", description="label texts with a model or a run")
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="an exported model or a run directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to label (repeatable)")
    source.add_argument("--file", help="a CSV file with a header row")
    parser.add_argument("--text-column", default="text", help="the CSV column of the texts (default: text)")
    parser.add_argument("--round", type=int, default=None, help="with a run directory: the round's model")
    args = parser.parse_args(argv)
    try:
        texts = args.text if args.text else read_texts(args.file, args.text_column)
        results = predictor(args.model, server_round=args.round)(texts) if texts else []
    except (ExportError, CheckpointError) as err:
        print(f"fedpriv predict: {err}", file=sys.stderr)
        return 2
    if args.file:
        writer = csv.writer(sys.stdout)
        writer.writerow([args.text_column, "label", "probability"])
        writer.writerows([text, label, f"{p:.4f}"] for text, (label, p) in zip(texts, results))
    else:
        for text, (label, p) in zip(texts, results):
            print(f"{label}\t{p:.4f}\t{text}")
    return 0


def verbosity(argv: list[str]) -> tuple[bool, str, list[str]]:
    """(verbose, command, its arguments): ``-v`` before the command, or first after ``simulate``
    (before the Hydra overrides, which would take it for one of theirs)."""
    verbose = False
    while len(argv) > 1 and argv[0] in VERBOSE_FLAGS:
        verbose, argv = True, argv[1:]
    command, rest = argv[0], argv[1:]
    if command == "simulate" and rest[:1] and rest[0] in VERBOSE_FLAGS:
        verbose, rest = True, rest[1:]
    return verbose, command, rest


def main() -> int:
    pin()  # fedpriv's packages from this install, not from a folder of the working directory
    from common.errors import ConfigError

    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    global _verbose
    _verbose, command, rest = verbosity(argv)
    _offline_env()
    if not _verbose:
        from server.runtime.terminal import quiet_environment

        quiet_environment()
    try:
        if command == "simulate":
            _hydra_simulate(rest)
            return 0
        if command == "report":
            return report(rest)
        if command == "audit":
            return audit(rest)
        if command == "device-log":  # the device's own view: client code, found by its entry point
            return int(load_command("device-log")(rest))
        if command == "explain":
            return explain(rest)
        if command == "export":
            return export_command(rest)
        if command == "predict":
            return predict_command(rest)
    except ConfigError as err:
        print(f"fedpriv: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"fedpriv: {err}", file=sys.stderr)
        return 2
    print(f"fedpriv: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
