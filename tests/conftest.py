"""Shared test helpers: real configs composed from conf/, offline settings."""

import contextlib
import copy
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")

# Small and fast: a 2-layer random BERT on 400 synthetic messages.
# recipe=finetune: every round trains through the encoder (the machinery these tests check);
# the recipe's prototype and head stages have tests of their own. model.pooling=pooler with
# normalize null and the encoder trainable: HF's own classifier (BertForSequenceClassification),
# the model these figures were set with.
# evaluation.explain_inputs=0: the run-end explanation page has tests of its own (tests/server/test_explain.py).
FAST = [
    "model=tiny_bert",
    "recipe=finetune",
    "model.pooling=pooler",
    "model.normalize=null",
    "model.freeze_encoder=false",
    "evaluation.explain_inputs=0",
    "data.train_size=400",
    "data.test_size=80",
    "train.batch_size=32",
    "train.local_epochs=1",
]
# For `fedpriv simulate` tests that check what a run records, not how clients run side by
# side: one Ray CPU, so one ClientAppActor serves every simulated client in turn. Nearly
# all of a small run's time is start-up, and each extra actor imports torch, transformers
# and opacus again (measured on 2 cores: 57 s -> 43 s for a 2-round, 2-client run).
ONE_ACTOR = "simulation.num_cpus=1"


def compose(overrides, run_dir: Path) -> dict:
    """The resolved config exactly as a run would see it (Hydra compose + resolve)."""
    from server.runtime.compose import compose_config

    cfg, _ = compose_config([*overrides, f"hydra.run.dir={run_dir}"])
    return cfg


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple) -> dict:
    return compose(list(overrides), Path(tempfile.gettempdir()) / "fedpriv-tests-compose")


def config_group(group: str, option: str, *overrides: str) -> dict:
    """The ``group`` section of the composed config with ``group=option`` (a fresh copy):
    what a function that takes one group gets in a run, conf/ holding its defaults."""
    return copy.deepcopy(_composed((f"{group}={option}", *overrides))[group])


def model_group(option: str) -> dict:
    """conf/model/<option>.yaml as common.model.factory.build_model's keyword arguments."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{option}.yaml"), resolve=True)
    return cfg


def one_dp_step(data, *, sigma: float, clip: float, **settings):
    """The TrainSettings of one DP-SGD step (SGD, lr 1) on a batch that is the whole dataset
    (q = 1): what the tests that check clipping and noise against a reference train."""
    from client.training.dp_train import DPSettings, TrainSettings

    return TrainSettings(
        epochs=1, batch_size=len(data), lr=1.0, optimizer="sgd", dp=DPSettings(sigma, clip, "rdp", ()), **settings
    )


@pytest.fixture
def fast_cfg(tmp_path):
    def make(*overrides):
        return compose([*FAST, *overrides], tmp_path / "run")

    return make


def run_fedpriv(args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    """`fedpriv ARGS` in a subprocess, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def child_env() -> dict:
    """The environment for a fedpriv subprocess: this tree's code, a private Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def server_of_run():
    """Flower refuses to build a Message outside a run; pretend to be one (server node 1 of
    server.runtime.grid's run), and leave Flower's task identity as it was found."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.runtime.grid import as_server_of_run

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    as_server_of_run()
    try:
        yield TaskIdentity
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def task_identity():
    with server_of_run() as identity:
        yield identity


@pytest.fixture(autouse=True)
def _processes_only_in_e2e(request, monkeypatch):
    """A test that starts a process (subprocess, fork) is an end-to-end test: it must be marked
    ``e2e``, so that ``make test-fast`` (``-m "not e2e"``) starts none."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    started = []
    popen_init = subprocess.Popen.__init__

    def tracked_popen(self, args, *rest, **kwargs):
        started.append(args if isinstance(args, str) else " ".join(map(str, args))[:120])
        return popen_init(self, args, *rest, **kwargs)

    fork = os.fork

    def tracked_fork():
        started.append("os.fork()")
        return fork()

    monkeypatch.setattr(subprocess.Popen, "__init__", tracked_popen)
    monkeypatch.setattr(os, "fork", tracked_fork)
    yield
    if started:
        pytest.fail(f"this test started a process ({started[0]}); mark it @pytest.mark.e2e", pytrace=False)
