"""The `fedpriv` CLI: every command answers --help, and the commands whose code is not the
server's are found by entry point."""

import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from server import cli
from tests.conftest import child_env

#: Every command, as DESIGN.md's "Commands" lists them; None: ``fedpriv --help`` itself.
COMMAND_NAMES = (None, "simulate", "report", "audit", "export", "predict", "explain", "device-log", "compare")

#: Runs ``fedpriv [COMMAND] FLAG`` in process for each command and flag, and prints (command, flag,
#: exit status, stdout) as JSON: one interpreter for all, since each import of torch costs seconds.
HELP_SCRIPT = """
import contextlib, io, json, sys
from server.cli import main
results = []
for command in json.loads(sys.argv[1]):
    for flag in ("--help", "-h"):
        sys.argv = ["fedpriv", *([command] if command else []), flag]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = main()
        except SystemExit as exit:
            code = exit.code
        results.append([command, flag, code or 0, out.getvalue()])
print(json.dumps(results))
"""


def test_audit_runs_the_client_side_runner_named_in_the_entry_points():
    from client.canary_audit import run_audit

    assert cli.load_command("audit") is run_audit


def test_installed_metadata_names_the_command_when_it_has_the_group(monkeypatch):
    import importlib.metadata

    def entry_points(group, name):
        assert (group, name) == (cli.COMMANDS, "audit")
        return [EntryPoint(name, "tests.server.test_cli:stub", group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert cli.load_command("audit") is stub


def test_a_command_nobody_declares_is_a_lookup_error():
    with pytest.raises(LookupError, match="fedpriv.commands"):
        cli.load_command("no-such-command")


def stub(*args, **kwargs):
    return "stub"


@pytest.mark.e2e  # one subprocess for every command
def test_every_command_answers_help_with_its_usage_and_exit_0(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, json.dumps(COMMAND_NAMES)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(COMMAND_NAMES)
    for command, flag, code, out in results:
        assert code == 0, (command, flag, out)
        usage = f"usage: fedpriv {command}" if command and command not in ("simulate", "audit") else "usage: fedpriv "
        assert out.startswith(usage), (command, flag, out[:300])
        assert (command or "simulate") in out.splitlines()[0]
        assert "Traceback" not in out and "not found" not in out
    simulate = next(out for command, _, _, out in results if command == "simulate")
    assert "fedpriv simulate is powered by Hydra" in simulate and "== Config ==" in simulate  # then Hydra's own help
