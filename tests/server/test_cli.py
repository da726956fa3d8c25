"""The `fedpriv` CLI finds the commands whose code is not the server's by entry point."""

from importlib.metadata import EntryPoint

import pytest

from server import cli


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
