"""What leaves a device when it fails: a fixed reason and a setting's name, never its data.

The real server loop (``server.round.loop.run_federation``) runs against the real ClientApp
(``client.app.app``) over the in-process Grid (``server.runtime.grid``) that turns a raised exception into an
error reply exactly as Flower does (``flwr/supernode/runtime/run_clientapp.py`` and the
simulation's ``vce_api``: ``str(type(ex)) + ":<'" + str(ex) + "'>"``). One device holds
a CSV with a label outside the run's labels, the other a data-path that does not
exist; neither the label nor either path may reach the server's log, ``metrics.jsonl``
or the report.
"""

from __future__ import annotations

import json
import logging

import pytest

import client.app as client_app
from server.round.loop import prepare, run_federation
from server.runtime.grid import InProcessGrid

SECRET_LABEL = "zq-billing-secret-label"
SECRET_DIR = "private-folder-of-alice-7f3a"


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_device_data_never_reaches_the_server(task_identity, fast_cfg, tmp_path, caplog, secagg):
    secret_dir = tmp_path / SECRET_DIR
    secret_dir.mkdir()
    bad_labels = secret_dir / "dev.csv"
    bad_labels.write_text("text,label\nplease refund my invoice,%s\nhello there,%s\n" % (SECRET_LABEL, SECRET_LABEL))
    absent = secret_dir / "absent.csv"
    cfg = fast_cfg("num_clients=2", "rounds=1", "node_wait_s=5", f"secagg={str(secagg).lower()}")
    prepared = prepare(cfg)
    cfg["data"]["labels"] = list(prepared.label_names)  # as server.runtime.deployment does for devices
    grid = InProcessGrid(
        {
            1: {"state-dir": str(tmp_path / "dev1"), "client-id": "alice", "data-path": str(bad_labels)},
            2: {"state-dir": str(tmp_path / "dev2"), "client-id": "bob", "data-path": str(absent)},
        }
    )
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        run_federation(grid, prepared, run_dir)

    secrets = (SECRET_LABEL, SECRET_DIR, str(bad_labels), str(absent))
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("client"))
    assert "failed" in server_log  # the server did log the failures ...
    for where, text in (
        ("server log", server_log),
        ("metrics.jsonl", (run_dir / "metrics.jsonl").read_text()),
        *(
            (name, (run_dir / name).read_text())
            for name in ("privacy_report.json", "privacy_report.md", "privacy_report.html", "clients_reported.json")
        ),
    ):
        for secret in secrets:
            assert secret not in text, f"{secret!r} reached the {where}"
    metrics = (run_dir / "metrics.jsonl").read_text()
    failed = json.loads(metrics)["failed"]
    assert {"node 1", "node 2"} <= set(failed)
    # Both paths name the failed nodes, so the report keeps the "may have spent more" caveat.
    caveats = (run_dir / "privacy_report.md").read_text()
    assert "Client node 1's reply for round(s) 1 never reached" in caveats
    assert "Client node 2's reply for round(s) 1 never reached" in caveats
    assert "node-config data-path" in metrics  # ... with the setting's name, so the owner knows what to fix
    # The device's own log keeps the full detail for its owner.
    handled = [r for r in caplog.records if r.name == "client.app"]
    assert handled and any(SECRET_LABEL in (r.exc_text or "") + str(r.exc_info) for r in handled)


def test_public_reason_is_fixed_text():
    from common.errors import ConfigError

    reason = client_app.public_reason(ConfigError("node-config data-path", f"/x/{SECRET_DIR} has {SECRET_LABEL}"))
    assert "node-config data-path" in reason and SECRET_DIR not in reason and SECRET_LABEL not in reason
    reason = client_app.public_reason(ValueError(f"row 3: {SECRET_LABEL}"))
    assert reason == "training failed on the device (ValueError); details are in the device's log"
    odd = client_app.public_reason(ConfigError(f"data.{SECRET_LABEL}\n/etc", "x"))
    assert SECRET_LABEL not in odd
