"""The terminal of `fedpriv simulate`: known third-party noise silenced where it starts (and kept
in cli.log), the summary table, and the exit decision for a run that trained nothing."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from server import cli
from server.runtime import simulate
from server.runtime.summary import RunSummary, every_client_failed, first_client_error
from server.runtime.terminal import ACTOR_NOISE, is_noise, quiet_environment, quiet_terminal

RAY_TIP = (
    "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
    "num_gpus=0 or num_gpus=None (default)."
)
PEFT_TIP = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`"
BANNER = (
    "The `run_simulation` function is deprecated and will be removed in a future version of Flower. "
    "Please use `flwr run` in the CLI instead to run your simulation."
)


def record(name: str, message: str, level=logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, (), None)


def test_only_the_known_third_party_messages_are_noise():
    assert is_noise(record("flwr", "DEPRECATED FEATURE: %s" % BANNER))
    assert is_noise(record("py.warnings", f"/x/ray/_private/worker.py:2051: FutureWarning: {RAY_TIP}\n"))
    assert is_noise(record("py.warnings", f"/x/peft/peft_model.py:184: FutureWarning: {PEFT_TIP}\n"))
    # Another deprecation of Flower's, another FutureWarning, or fedpriv's own words are not.
    assert not is_noise(record("flwr", "DEPRECATED FEATURE: Passing `enable_tf_gpu_growth=True` is deprecated."))
    assert not is_noise(record("py.warnings", "/x/torch/nn.py:1: FutureWarning: something else changes\n"))
    assert not is_noise(record("server.round.loop", f"round 1 skipped: {RAY_TIP}"))


@pytest.fixture
def job_logging(tmp_path):
    """Root handlers as Hydra's job logging sets them: a console stream and cli.log."""
    root = logging.getLogger()
    console = logging.StreamHandler(io.StringIO())
    log_file = logging.FileHandler(tmp_path / "cli.log")
    saved = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(log_file)
    yield console, tmp_path / "cli.log"
    root.removeHandler(console)
    root.removeHandler(log_file)
    log_file.close()
    root.setLevel(saved)


def emit_run_messages() -> None:
    from flwr.common.logger import warn_deprecated_feature

    warn_deprecated_feature(BANNER)
    warnings.warn_explicit(RAY_TIP, FutureWarning, "/x/ray/_private/worker.py", 2051, module="ray._private.worker")
    warnings.warn_explicit("another library changes", FutureWarning, "/x/other.py", 3, module="other")
    logging.getLogger("server.round.loop").info("model: 165 of 1010469 parameters train")
    logging.getLogger("server.round.loop").warning("round 1 skipped: 0 updates accepted")


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_quiet_terminal_omits_the_noise_and_cli_log_keeps_everything(job_logging, capsys, verbose):
    from flwr.common.logger import console_handler as flower_console

    console, cli_log = job_logging
    # Flower's own handler holds whatever std stream it was given first (another test's
    # capture, in a whole-suite run): point it at a buffer of this test's.
    flower_out = io.StringIO()
    previous, flower_console.stream = flower_console.stream, flower_out  # setStream would flush a closed one
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with quiet_terminal(verbose=verbose):
                emit_run_messages()
    finally:
        flower_console.stream = previous
    terminal = console.stream.getvalue() + flower_out.getvalue() + "".join(capsys.readouterr())
    kept = cli_log.read_text()
    for text in ("DEPRECATED FEATURE", RAY_TIP, "another library changes", "165 of 1010469", "round 1 skipped"):
        assert text in kept, text
    assert "round 1 skipped" in terminal and "another library changes" in terminal
    for text in ("DEPRECATED FEATURE", RAY_TIP, "165 of 1010469"):
        assert (text in terminal) == verbose, text
    # Left as found: the next job of a sweep starts from Hydra's own set-up.
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    assert console.level == logging.NOTSET and not console.filters and not console_handler.filters
    assert not any(isinstance(h, logging.FileHandler) for h in FLOWER_LOGGER.handlers)


@pytest.mark.e2e  # starts a process
def test_actors_inherit_a_filter_for_the_peft_warning_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    quiet_environment(env)
    assert env["RAY_DEDUP_LOGS_SKIP_REGEX"] == ACTOR_NOISE and env["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    code = (
        "import warnings\n"
        f"warnings.warn({PEFT_TIP!r}, FutureWarning)\n"
        "warnings.warn('another library changes', FutureWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "is_gradient_checkpointing" not in done.stderr
    assert "another library changes" in done.stderr
    quiet_environment(env)  # twice: the filter is not added again
    assert env["PYTHONWARNINGS"].count("is_gradient_checkpointing") == 1


def test_ray_drops_only_the_actor_termination_line():
    from ray._private.ray_logging import LogDeduplicator

    lines = [
        "\x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor",
        "ERROR: this device could not answer the train request",
    ]
    out = LogDeduplicator(5, None, ACTOR_NOISE).deduplicate({"ip": "127.0.0.1", "pid": 4, "lines": lines})
    assert [line for batch in out for line in batch["lines"]] == lines[1:]


def metrics(trained=0, declined=0, rejected=0, failed=None, missing=0, round_=1, accuracy=0.25) -> dict:
    failed = failed or {}
    return {
        "round": round_,
        "accuracy": accuracy,
        "clients_trained": trained,
        "clients_declined": declined,
        "clients_rejected": rejected,
        "clients_failed": len(failed),
        "clients_missing": missing,
        "declined": {},
        "rejected": {},
        "failed": failed,
    }


ERROR = (
    "2: <class 'client.app.DeviceError'>:<'the device refused the request: setting node-config data-path is invalid'>"
)


def test_every_client_failed_and_the_first_error():
    assert every_client_failed(metrics(failed={"node 2": ERROR}))
    assert every_client_failed(metrics(missing=2))
    assert not every_client_failed(metrics(trained=1, failed={"node 2": ERROR}))
    assert not every_client_failed(metrics(declined=2))
    records = [metrics(declined=1, round_=1), metrics(failed={"node 3": ERROR, "node 2": "x"}, round_=2)]
    assert first_client_error(records) == "round 2, node 2: x"
    assert first_client_error([metrics(failed={"node 2": ERROR})]) == (
        "round 1, node 2: the device refused the request: setting node-config data-path is invalid"
    )
    cut = (
        "2: <class 'client.app.DeviceError'>:<'the device refused the re"  # server.round.aggregate keeps 300 characters
    )
    assert first_client_error([metrics(failed={"node 2": cut})]) == "round 1, node 2: the device refused the re"


def summary(tmp_path, records, clients=()) -> RunSummary:
    return RunSummary(tmp_path, 2, records, list(clients), None)


def test_only_declines_is_not_a_failure_but_is_said(tmp_path):
    done = summary(tmp_path, [metrics(declined=2, round_=1), metrics(declined=2, round_=2)])
    assert done.failure() is None and "every client declined" in done.note()
    mixed = summary(tmp_path, [metrics(declined=2, round_=1), metrics(failed={"node 1": ERROR}, round_=2)])
    assert "no client trained in any round; first client error: round 2, node 1" in mixed.failure()
    trained_once = summary(tmp_path, [metrics(trained=1, round_=1), metrics(failed={"node 1": ERROR}, round_=2)])
    assert trained_once.failure() is None and trained_once.note() is None
    assert dict(trained_once.rows())["rounds"] == "2 of 2 (every client failed in round 2)"


def test_summary_rows_state_epsilon_against_the_budget(tmp_path):
    clients = [
        {"client_id": "0", "epsilon": 7.9996, "budget_epsilon": 8.0},
        {"client_id": "1", "epsilon": 2.5, "budget_epsilon": 3.0},
    ]
    rows = dict(
        summary(
            tmp_path,
            [metrics(trained=2, accuracy=0.5975), metrics(trained=1, declined=1, rejected=1, accuracy=0.61, round_=2)],
            clients,
        ).rows()
    )
    assert rows == {
        "rounds": "2 of 2",
        "final accuracy": "0.610",
        "highest client ε": "8.000 of 8.000 (client 0)",
        "lowest client ε": "2.500 of 3.000 (client 1)",
        "declines": "1",
        "rejections": "1",
        "report": str(tmp_path / "privacy_report.md"),
    }


def test_a_run_in_which_every_client_failed_exits_1_with_the_first_error(task_identity, fast_cfg, tmp_path, capsys):
    """The real loop over the in-process grid: both devices' data-path does not exist."""
    from server.round.loop import prepare, run_federation
    from server.runtime.grid import InProcessGrid

    prepared = prepare(fast_cfg("num_clients=2", "rounds=2", "node_wait_s=5"))
    prepared.cfg["data"]["labels"] = list(prepared.label_names)  # as server.runtime.deployment does for devices
    grid = InProcessGrid(
        {
            n: {"state-dir": str(tmp_path / f"dev{n}"), "client-id": f"c{n}", "data-path": str(tmp_path / "absent.csv")}
            for n in (1, 2)
        }
    )
    run_dir = tmp_path / "run"
    run_federation(grid, prepared, run_dir)
    assert json.loads((run_dir / "privacy_report.json").read_text())  # the untrained model's report exists ...

    assert simulate.finish(run_dir) == 1  # ... but the run failed
    out, err = capsys.readouterr()
    failure = [line for line in err.splitlines() if line.startswith("fedpriv:")]
    assert failure == [
        "fedpriv: no client trained in any round; first client error: round 1, node 1: the device "
        "refused the request: setting node-config data-path is invalid; details are in the "
        "device's log"
    ]
    assert "every client failed in round 1, 2" in out and "privacy_report.md" in out


def test_the_verbose_flag_goes_before_the_overrides():
    assert cli.verbosity(["-v", "simulate", "rounds=2"]) == (True, "simulate", ["rounds=2"])
    assert cli.verbosity(["simulate", "--verbose", "-m", "rounds=1,2"]) == (True, "simulate", ["-m", "rounds=1,2"])
    assert cli.verbosity(["simulate", "rounds=2"]) == (False, "simulate", ["rounds=2"])
    assert cli.verbosity(["-v"]) == (False, "-v", [])  # no command: the usage error names it


def test_a_token_run_summary_states_its_entity_f1(tmp_path):
    tagged = {**metrics(trained=2, accuracy=0.937), "micro_f1": 0.3023}
    rows = dict(summary(tmp_path, [tagged]).rows())
    assert rows["final entity F1"] == "0.302 (micro)"
    assert "final entity F1" not in dict(summary(tmp_path, [metrics(trained=2, accuracy=0.5)]).rows())
