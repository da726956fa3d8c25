"""fedpriv-superexec (client/launcher.py): each task in its own forked process, which starts as a
fresh one would (its own torch, numpy and random generators, no CUDA context, the parent
untouched), is reaped, and whose failure ends in the child, never in the launcher's loop."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from client import launcher
from client.app import FORKED_AT

pytestmark = pytest.mark.e2e  # every test here forks the launcher's children


def spec(task_id: int) -> SimpleNamespace:
    return SimpleNamespace(task_id=task_id)


def wait_reaped(executor: launcher.ForkExecutor, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while executor.children:
        assert time.monotonic() < deadline, f"children not reaped: {executor.children}"
        executor.reconcile()
        time.sleep(0.02)


def test_each_task_runs_in_its_own_child_with_its_own_numpy_generator(tmp_path):
    def run(task):  # in the child
        Path(tmp_path, f"{task.task_id}.json").write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "ppid": os.getppid(),
                    "draw": np.random.random(4).tolist(),
                    "forked_at": os.environ.get(FORKED_AT),
                }
            )
        )

    np.random.seed(1234)  # what a parent's import-time state would give every child if not reseeded
    parent_next = np.random.RandomState(1234).random(4).tolist()
    executor = launcher.ForkExecutor(run=run)
    before = time.time()
    results = [executor.launch(spec(i)) for i in (1, 2)]
    assert all(r.status == "accepted" for r in results)
    wait_reaped(executor)
    children = [json.loads(Path(tmp_path, f"{i}.json").read_text()) for i in (1, 2)]
    assert {c["ppid"] for c in children} == {os.getpid()}
    assert children[0]["pid"] != children[1]["pid"] and os.getpid() not in {c["pid"] for c in children}
    assert children[0]["draw"] != children[1]["draw"]  # reseeded from the OS in each child
    assert parent_next not in [c["draw"] for c in children]
    assert np.random.random(4).tolist() == parent_next  # the parent's own state is untouched
    assert all(before <= float(c["forked_at"]) <= time.time() for c in children)
    assert FORKED_AT not in os.environ


def test_children_of_one_parent_draw_from_their_own_global_generators():
    """Two children forked from one parent draw different torch (dropout masks), numpy and
    random values: without fresh_child both would continue the parent's state."""
    import torch

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    draws = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                os.close(read)
                launcher.fresh_child()
                os.write(
                    write,
                    json.dumps(
                        {
                            "torch": torch.rand(4).tolist(),
                            "numpy": np.random.random(4).tolist(),
                            "random": [random.random() for _ in range(4)],
                        }
                    ).encode(),
                )
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        deadline = time.monotonic() + 60
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("a child did not end")
            time.sleep(0.02)
        with os.fdopen(read) as pipe:
            out = pipe.read()
        assert os.waitstatus_to_exitcode(ended[1]) == 0
        draws.append(json.loads(out))
    for generator in ("torch", "numpy", "random"):
        assert draws[0][generator] != draws[1][generator], generator


@pytest.mark.parametrize(
    "failure, code",
    [(SystemExit(3), 3), (RuntimeError("boom"), 1), (None, 0)],
    ids=["flwr_exit", "exception", "success"],
)
def test_a_child_ends_in_the_child_with_its_exit_code(tmp_path, failure, code):
    marker = tmp_path / "after"

    def run(task):
        if failure is not None:
            raise failure

    executor = launcher.ForkExecutor(run=run)
    executor.launch(spec(7))
    marker.write_text(str(os.getpid()))  # only this process gets here: the child never returns
    wait_reaped(executor)
    assert marker.read_text() == str(os.getpid())
    assert list(executor.ended) == [code]


def test_warm_up_imports_the_client_app_and_leaves_cuda_alone():
    import subprocess

    probe = (
        "import sys, client.launcher as l; l.warm_up(); import torch; "
        "print(all(m in sys.modules for m in ('client.app', 'client.round', 'opacus')), "
        "torch.cuda.is_initialized())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(launcher.__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]


def test_the_command_refuses_tls_without_a_ca_and_a_bad_poll_interval(capsys):
    for argv in (
        ["--runtime-api-address", "127.0.0.1:1"],
        ["--runtime-api-address", "127.0.0.1:1", "--insecure", "--poll-interval", "0"],
    ):
        with pytest.raises(SystemExit) as stop:
            launcher.main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--root-certificates" in err and "--poll-interval" in err
