"""MLflow as fedpriv talks to it: the light client (``mlflow-skinny``, the extra ``fedpriv[mlflow]``).

Only :class:`mlflow.tracking.MlflowClient` is used, never the fluent API (``mlflow.start_run``):
its active-run stack is global to the process, which would tie a sweep's jobs, a resumed run
and the ServerApp's thread together. Every call here may raise whatever MLflow raises; the
caller (``server.tracking.tracker``) turns the first failure into one warning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.errors import ConfigError
from server.tracking.runs import flat

#: MLflow's settings that fedpriv changes unless the user set them.
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # a privacy tool does not phone home by default
    # A tracking server that is down costs seconds, not MLflow's default of minutes of retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
#: MLflow limits: params per batch call, characters of a param value.
PARAMS_PER_CALL, PARAM_VALUE_CHARS = 100, 6000
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI nests the run under that one


def require() -> None:
    """Refuse ``tracking=mlflow`` when the client is not installed: a setting, not an outage."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking", "tracking=mlflow needs MLflow's client: pip install 'fedpriv[mlflow]'")


def store_uri(uri: str) -> str:
    """A plain path is a file store (as an absolute ``file:`` URI); a URI with a scheme is MLflow's."""
    if ":" in uri.split("/", 1)[0]:
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def connect(uri: str):
    """An ``MlflowClient`` of ``uri`` (a file store is created on first use; a server is not contacted)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it without this opt-in;
        # it is the store that needs nothing started (tracking.uri=sqlite:///... is the other).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The id of the experiment ``name``, created if absent (by whichever job comes first)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def create_run(client, experiment: str, *, name: str, parent_id: str | None, tags: Mapping[str, str]) -> str:
    tags = {**tags, **({PARENT_TAG: parent_id} if parent_id else {})}
    return client.create_run(experiment, run_name=name, tags=dict(tags)).info.run_id


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value[:PARAM_VALUE_CHARS]) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_CALL])


def log_metrics(client, run_id: str, step: int, metrics: Iterable[tuple[str, float]]) -> None:
    """One round's metrics at ``step``, in the given order (a file store writes them in turn)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics])


def logged_steps(client, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_files(client, run_id: str, files: Iterable[Path], folder: str) -> None:
    for path in files:
        client.log_artifact(run_id, str(path), folder)


def set_status(client, run_id: str, status: str) -> None:
    """``RUNNING`` again for a resumed run, ``FINISHED`` or ``FAILED`` at its end."""
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def flat_params(cfg: Mapping) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (``runs.flat``), non-strings as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flat(cfg).items()}
