"""Comparing runs and tracking them (server.tracking), through the real round loop in process.

A two-point ε sweep laid out as Hydra's multirun lays it out (``SWEEP/0``, ``SWEEP/1``), each job
linked to the sweep's parent MLflow run as ``fedpriv simulate -m`` links it, run by
``server.runtime.serve.federate`` over the in-process grid, into a file store under tmp.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from common.report import build_report, read_evaluation, read_metrics
from common.rundir import RunDir, SweepDir
from server.round.loop import prepare
from server.runtime.grid import InProcessGrid
from server.runtime.serve import federate
from server.tracking import mlflow_client
from server.tracking.compare import CompareError, compare
from server.tracking.sweep import finish_sweep, link_job
from server.tracking.tracker import RECORD_METRICS
from tests.conftest import FAST, compose, server_of_run

SMALL = [*FAST, "num_clients=2", "rounds=2", "node_wait_s=5", "tracking=mlflow"]
EPSILONS = (1, 8)
ALLOWED_METRICS = {"accuracy", "epsilon_max", "epsilon_min", "epsilon_client_level", *RECORD_METRICS}


def _run(cfg: dict, run_dir, *, resume: bool = False) -> dict:
    return federate(InProcessGrid(int(cfg["num_clients"])), prepare(cfg), run_dir, resume=resume, progress_bar=False)


def _uri(path) -> str:
    return mlflow_client.store_uri(str(path))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(multirun directory, file store URI): both jobs run and the sweep finished."""
    root = tmp_path_factory.mktemp("tracking")
    multirun, store = root / "multirun", root / "mlruns"
    with server_of_run():
        for job, epsilon in enumerate(EPSILONS):
            run_dir = multirun / str(job)
            cfg = compose([*SMALL, f"tracking.uri={store}", f"privacy.sample.epsilon={epsilon}"], run_dir)
            link_job(cfg, run_dir, multirun, name=f"{job}: privacy.sample.epsilon={epsilon}")
            _run(cfg, run_dir)
    finish_sweep(multirun)
    return multirun, _uri(store)


@pytest.fixture
def searched(sweep, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep[1])  # fedpriv never sets MLflow's process-wide URI
    return mlflow.search_runs(experiment_names=["fedpriv"], output_format="list")


def test_a_two_point_sweep_is_compared_with_both_points_and_the_key_that_differs(sweep, tmp_path):
    multirun, _ = sweep
    page = SweepDir(multirun).comparison
    assert page.is_file() and not SweepDir(multirun).tracking_lock.exists()  # written when the sweep ended
    found = compare([multirun], tmp_path / "again.html")
    assert found.keys == ["privacy.sample.epsilon"]  # found from the configs (state_dir differs too, ignored)
    assert [run.label for run in found.runs] == ["0", "1"]
    assert [found.setting(run, "privacy.sample.epsilon") for run in found.runs] == ["1", "8"]
    for run, epsilon in zip(found.runs, EPSILONS):
        clients = run.report["sample_level"]["clients"]
        assert run.epsilon.value == max(c["epsilon"] for c in clients) <= epsilon
        assert run.epsilon.delta == 1e-5
    text = page.read_text()
    assert "privacy.sample.epsilon" in text and "<td>1</td>" in text and "<td>8</td>" in text
    assert text.count("data:image/png;base64,") == 2  # the curve and the rounds, inlined
    assert 'href="0/privacy_report.html"' in text and 'href="1/privacy_report.html"' in text
    row = found.rows()[0]
    assert row[0] == "0" and row[-3] == "2 of 2" and row[-2] == "0"


def test_the_file_store_holds_one_nested_run_per_job_with_its_rounds_and_report(sweep, searched):
    multirun, uri = sweep
    client = MlflowClient(uri)
    parents = [r for r in searched if mlflow_client.PARENT_TAG not in r.data.tags]
    jobs = [r for r in searched if mlflow_client.PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and len(jobs) == len(EPSILONS)
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "comparison")] == ["comparison/comparison.html"]
    by_epsilon = {run.data.params["privacy.sample.epsilon"]: run for run in jobs}
    assert set(by_epsilon) == {"1", "8"}
    for job, epsilon in enumerate(EPSILONS):
        run = by_epsilon[str(epsilon)]
        run_dir = RunDir(multirun / str(job))
        assert json.loads(run_dir.tracking.read_text())["run_id"] == run.info.run_id  # kept for resume
        assert run.data.tags[mlflow_client.PARENT_TAG] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) <= ALLOWED_METRICS and "epsilon_max" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == [r["accuracy"] for r in read_metrics(run_dir.path)]
        report = json.loads(run_dir.report_json.read_text())
        top = max(c["epsilon"] for c in report["sample_level"]["clients"])
        assert client.get_metric_history(run.info.run_id, "epsilon_max")[-1].value == pytest.approx(top, rel=1e-12)
        stored = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert {f"report/{p.name}" for p in (run_dir.report_json, run_dir.report_md, run_dir.report_html)} <= stored
        assert {a.path for a in client.list_artifacts(run.info.run_id, "report/plots")} >= {
            "report/plots/epsilon_per_round.png",
            "report/plots/accuracy_per_round.png",
        }


def test_an_export_adds_its_model_card_to_the_run_it_came_from(sweep, tmp_path):
    from server.release.export import EXPORT_META
    from server.release.model_card import CARD_FILE
    from server.tracking.tracker import store_export

    multirun, uri = sweep
    out = tmp_path / "model"
    out.mkdir()
    (out / CARD_FILE).write_text("# a model card\n")
    (out / EXPORT_META).write_text("{}\n")
    store_export(multirun / "0", out)
    run_id = json.loads(RunDir(multirun / "0").tracking.read_text())["run_id"]
    stored = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "model_card")}
    assert stored == {f"model_card/{CARD_FILE}", f"model_card/{EXPORT_META}"}
    store_export(tmp_path, out)  # an untracked run: nothing to do, nothing raised


def test_runs_of_different_data_are_refused_naming_the_setting(sweep, tmp_path):
    multirun, _ = sweep
    other = tmp_path / "other"
    shutil.copytree(multirun / "1", other)
    config = RunDir(other).config_file
    stored = OmegaConf.load(config)
    stored.data.train_size = 200
    OmegaConf.save(stored, config)
    with pytest.raises(CompareError, match=r"different data or test sets \(data\.train_size"):
        compare([multirun / "0", other], tmp_path / "page.html")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracker_warns_once_and_the_report_is_unchanged(task_identity, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after retries
    run_dir = tmp_path / "run"
    cfg = compose([*SMALL, f"tracking.uri=http://127.0.0.1:{_closed_port()}"], run_dir)
    with caplog.at_level(logging.WARNING):
        report = _run(cfg, run_dir)
    warned = [r for r in caplog.records if r.name.startswith("server.tracking")]
    assert len(warned) == 1 and "the run goes on untracked" in warned[0].getMessage()
    run = RunDir(run_dir)
    assert not run.tracking.exists()
    assert len(report["rounds"]) == 2 and json.loads(run.report_json.read_text()) == report
    # The same report as the run would have had untracked: nothing of the tracker is in it.
    untracked = {**cfg, "tracking": {"name": "none", "uri": None}}
    rebuilt = build_report(
        config=untracked,
        clients_reported=json.loads(run.clients_reported.read_text()),
        rounds=read_metrics(run_dir),
        evaluation=read_evaluation(run_dir),
    )
    assert {k: v for k, v in rebuilt.items() if k != "config"} == {k: v for k, v in report.items() if k != "config"}


def test_a_resumed_run_continues_its_mlflow_run_without_gap_or_repeat(task_identity, tmp_path, monkeypatch, caplog):
    run_dir, store = tmp_path / "run", tmp_path / "mlruns"
    cfg = compose([*SMALL, f"tracking.uri={store}"], run_dir)
    logged = mlflow_client.log_metrics

    def down_in_round_2(client, run_id, step, metrics):
        if step == 2:
            raise ConnectionError("tracker down")
        logged(client, run_id, step, metrics)

    monkeypatch.setattr(mlflow_client, "log_metrics", down_in_round_2)
    with caplog.at_level(logging.WARNING):
        _run(cfg, run_dir)  # round 2 never reaches the tracker: one warning
    assert len([r for r in caplog.records if r.name.startswith("server.tracking")]) == 1
    run_id = json.loads(RunDir(run_dir).tracking.read_text())["run_id"]
    monkeypatch.setattr(mlflow_client, "log_metrics", logged)

    resumed = RunDir(run_dir).config()
    resumed["rounds"], resumed["resume"] = 3, str(run_dir)
    report = _run(resumed, run_dir, resume=True)

    client = MlflowClient(_uri(store))
    assert json.loads(RunDir(run_dir).tracking.read_text())["run_id"] == run_id
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("fedpriv").experiment_id])] == [
        run_id
    ]
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "accuracy")
    assert [m.step for m in history] == [1, 2, 3]  # round 2 caught up on resume, none twice
    assert [m.value for m in history] == [r["accuracy"] for r in report["rounds"]]
    # Each round's ε range is the report's per-round ε, recomputed from the histories: a client's
    # ε after its last round up to that one (round 3 was planned for no budget: all declined).
    assert [m.value for m in client.get_metric_history(run_id, "clients_declined")] == [0, 0, 2]
    highest = client.get_metric_history(run_id, "epsilon_max")
    assert [m.step for m in highest] == [1, 2, 3]
    for point in highest:
        after = [
            [p["epsilon"] for p in c["per_round"] if p["round"] <= point.step][-1]
            for c in report["sample_level"]["clients"]
        ]
        assert point.value == pytest.approx(max(after), rel=1e-12)
