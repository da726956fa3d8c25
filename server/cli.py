"""The ``fedpriv`` command: its arguments, and which code each command runs (DESIGN.md, "Commands").

``simulate`` runs in ``server.runtime.simulate``, ``audit`` in ``server.runtime.audit``,
``explain``, ``export`` and ``predict`` on ``server.release``, ``compare`` in ``server.tracking``.
The commands whose code is client code (the audit's runner, ``device-log``) are found through the ``fedpriv.commands``
entry points (packaging metadata, pyproject's ``[project.entry-points."fedpriv.commands"]``),
not by a name in ``server/``. Every command answers ``-h``/``--help`` with its usage, exit 0.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from server.runtime.pinning import ROOT, load, pin

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
       fedpriv predict MODEL_OR_RUN (--text T [--text T ...] | --file F.csv [--text-column text])
       fedpriv predict --device STATE_DIR [--client ID] --text T [--text T ...]
                                                a device's own personal model (personalize=finetune|mixture)
       fedpriv compare DIR [DIR ...] [--out FILE.html]   runs side by side: what differs, accuracy
                                                against epsilon (DIR: a run or a -m multirun directory)"""

#: ``fedpriv simulate --help`` prints this, then Hydra's help (the config groups and the config).
SIMULATE_USAGE = """usage: fedpriv [-v] simulate [HYDRA_OVERRIDES ...] [-m]

Run N simulated clients on this machine (Hydra overrides; -m for sweeps; -v: the full logs
on the terminal, not only warnings). A bad setting exits 2 with one line naming it."""

AUDIT_USAGE = """usage: fedpriv [-v] audit [HYDRA_OVERRIDES ...]

One-run empirical privacy audit: canaries among held-out examples, one training run, and the
lower bound on epsilon that the canary guesses give, judged against the accounted epsilon.
Settings: audit.canaries, audit.guesses, audit.client, audit.noise, audit.confidence, and any
run setting (Hydra overrides, as for simulate); audit=power selects the preset with measured
power. Writes RUN_DIR/audit.json; exits 1 when the bound exceeds the accounted epsilon."""

#: The entry-point group of the commands whose code is not the server's (``audit``: ``run_audit``).
COMMANDS = "fedpriv.commands"

#: ``fedpriv -v``: the terminal shows every log line and third-party message (server.runtime.terminal).
VERBOSE_FLAGS = ("-v", "--verbose")
HELP_FLAGS = ("-h", "--help")


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


def report(argv: list[str]) -> int:
    import argparse

    from common.report import render_run_dir

    parser = argparse.ArgumentParser(
        prog="fedpriv report",
        description="re-render a run's privacy report from its run directory (every epsilon recomputed)",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    report = render_run_dir(args.run_dir)
    print(
        f"fedpriv: report re-rendered in {args.run_dir / 'privacy_report.md'} "
        f"({len(report['sample_level']['clients'])} clients)"
    )
    return 0


def audit(argv: list[str]) -> int:
    """``fedpriv audit [HYDRA_OVERRIDES ...]`` (server.runtime.audit); ``--help`` before Hydra reads the overrides."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(AUDIT_USAGE)
        return 0
    from server.runtime.audit import run

    return run(argv, lambda: load_command("audit"))


def simulate(argv: list[str], *, verbose: bool) -> int:
    """``fedpriv simulate [HYDRA_OVERRIDES ...]`` (server.runtime.simulate); ``--help`` adds Hydra's help."""
    from server.runtime.simulate import main as run

    if any(arg in HELP_FLAGS for arg in argv):
        print(SIMULATE_USAGE + "\n")
        argv = [*argv, "hydra.help.app_name='fedpriv simulate'"]  # Hydra's header names the command
    run(argv, verbose=verbose)
    return 0


def explain(argv: list[str]) -> int:
    """Predicted class per text, and the page with attention maps and token shading."""
    import argparse

    from server.release.explain_page import CLI_PAGE, write_explanations
    from server.release.released import load_released
    from server.round.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(
        prog="fedpriv explain",
        description="What the released global model "
        "of a run predicts for the given texts and what it attends to; no client data.",
    )
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

    from server.release.export import ExportError, export
    from server.round.checkpoint import CheckpointError

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
    from server.tracking.tracker import store_export

    store_export(args.run_dir, done.out)  # a tracked run's MLflow run gets the model card
    merged = " (LoRA adapter merged into the encoder)" if done.merged else ""
    print(
        f"fedpriv: round {done.meta['round']} exported to {done.out} as a {done.layout} model{merged}; "
        f"model card {done.out / 'README.md'}"
    )
    return 0


def predict_command(argv: list[str]) -> int:
    """``fedpriv predict MODEL_OR_RUN --text T ... | --file F.csv [--text-column C]`` (server.release.predict);
    with ``--device STATE_DIR`` a device's personal model (client code, found by its entry point)."""
    if any(arg == "--device" or arg.startswith("--device=") for arg in argv):
        return int(load_command("predict-device")(argv))
    import argparse
    import csv

    from server.release.export import ExportError
    from server.release.predict import predictor, read_texts
    from server.round.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(
        prog="fedpriv predict",
        description="label texts with a model or a run",
        epilog="fedpriv predict --device STATE_DIR [--client ID] --text T: a device's own personal model "
        "(personalize=finetune|mixture), read on the device from its state directory",
    )
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


def compare_command(argv: list[str]) -> int:
    """``fedpriv compare DIR [DIR ...] [--out FILE.html]`` (server.tracking.compare)."""
    import argparse

    from server.tracking.compare import show_comparison

    parser = argparse.ArgumentParser(
        prog="fedpriv compare",
        description="Compare runs: a table of what differs between their configs, final accuracy and "
        "macro F1, the highest client epsilon, rounds, declines and wall time, and a page with the "
        "privacy-utility curve, the accuracy per round and links to each run's report.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a run directory, or a multirun directory")
    parser.add_argument(
        "--out",
        type=Path,
        help="the HTML page (default: DIR/comparison.html for one multirun directory, else comparison.html here)",
    )
    args = parser.parse_args(argv)
    return show_comparison(args.dirs, args.out)


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
    if not argv or argv[0] in HELP_FLAGS:
        print(USAGE)
        return 0 if argv else 2
    verbose, command, rest = verbosity(argv)
    if command in HELP_FLAGS:  # fedpriv -v --help
        print(USAGE)
        return 0
    _offline_env()
    if not verbose:
        from server.runtime.terminal import quiet_environment

        quiet_environment()
    commands = {
        "simulate": lambda: simulate(rest, verbose=verbose),
        "report": lambda: report(rest),
        "audit": lambda: audit(rest),
        # The device's own view: client code, found by its entry point.
        "device-log": lambda: int(load_command("device-log")(rest)),
        "explain": lambda: explain(rest),
        "export": lambda: export_command(rest),
        "predict": lambda: predict_command(rest),
        "compare": lambda: compare_command(rest),
    }
    if command not in commands:
        print(f"fedpriv: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command]()
    except ConfigError as err:
        print(f"fedpriv: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"fedpriv: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
