"""``fedpriv-superexec``: a device's ClientApp launcher whose messages start already imported.

Flower's SuperNode, in its default ``--isolation subprocess``, starts ``flower-superexec``,
which asks the SuperNode's Runtime API for a task once a second and starts a fresh
``flwr-clientapp`` process for each one: Python, Flower, torch, Opacus and fedpriv are
imported again for every message (most of a message's overhead: BENCHMARKS.md,
deployment). With ``flower-supernode --isolation process`` the
SuperNode leaves launching to a process outside it; this is one. It imports the ClientApp
and its libraries once, then for each task the SuperNode hands out it forks a child that
runs Flower's own ``run_clientapp`` with that task's token (the same pull of message,
context and app bundle, the same handler, the same push of reply and status) and exits.

What that means for the device, stated outright:

- **One process per message still.** A child is a fork of a parent that has imported
  modules and never run a message, so no data, model, gradient or generator state of one
  message reaches another. The parent touches no data and no CUDA (a CUDA context does not
  survive a fork; a child initialises its own).
- **Randomness.** DP noise is drawn from generators seeded from ``os.urandom`` when a round
  builds them (``common.privacy.randomness``), in the child. The global generators a fork child
  inherits would draw what its siblings draw (torch's, so the same dropout masks in every
  message; numpy's), so the child reseeds each from the OS: torch's CPU generator (and
  CUDA's, when the child initialises it), numpy's, and Python's ``random``.
- **Which code runs.** The ClientApp is the one installed on the device: the app bundle a
  run brings names the component (``client.app:app``), and a module the parent already
  imported is not imported again from the bundle. A server cannot replace the device's
  fedpriv by shipping other code under the same names. A bundle that names another
  component is loaded from the bundle as Flower does.
- Only ClientApp tasks are taken. A child's failure is Flower's: the handler's fixed-text
  error reply (client/app.py), and the task's status.

    flower-supernode --isolation process --host 127.0.0.1 --port 9094 ...
    fedpriv-superexec --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <SuperNode pid>

(``deploy/fedpriv-deploy.sh supernode`` starts both; ``FEDPRIV_LAUNCHER=flower`` keeps Flower's
own per-message process.) The Runtime API is the SuperNode's loopback HTTP API, insecure as in
Flower's subprocess mode; the device's TLS and authentication are towards the SuperLink.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable

#: What every message would import (client.app pulls client.round, torch, Opacus, transformers).
WARM_MODULES = ("client.app", "flwr.supernode.runtime.run_clientapp")
#: Seconds between two asks for a task (flower-superexec: 1 s); an ask is one loopback request.
POLL_S = 0.05

log = logging.getLogger(__name__)


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> None:
    """Import what a message needs, once, in the parent; nothing else runs here."""
    for name in modules:
        importlib.import_module(name)


def fresh_child() -> None:
    """What a fork child resets so that no two children share a random stream: every global
    generator, from the OS. torch's CPU generator (``torch.seed``, which also queues CUDA's
    seeding for when the child initialises CUDA; a parent never does), CUDA's now if it is
    initialised, numpy's and Python's ``random`` (CPython reseeds it after a fork; done here
    all the same). It also notes when it began, for ``FEDPRIV_PROFILE`` (client/app.py)."""
    import random

    import numpy as np
    import torch

    from client.app import FORKED_AT

    os.environ[FORKED_AT] = repr(time.time())
    torch.seed()
    if torch.cuda.is_initialized():
        torch.cuda.seed_all()
    np.random.seed(None)
    random.seed()


def run_clientapp_task(spec) -> None:
    """Flower's per-task ClientApp run, as ``flwr-clientapp --token`` runs it."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=False,
    )


class ForkExecutor:
    """A SuperExec executor (Flower's ``Executor`` protocol) that forks the warm parent per task."""

    def __init__(self, run: Callable = run_clientapp_task):
        self.run = run
        self.children: set[int] = set()
        self.ended: deque[int] = deque(maxlen=64)  # the latest children's exit codes

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.superexec.executor import LaunchResult

        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fresh_child()
                self.run(spec)
                code = 0
            except SystemExit as done:  # flwr_exit ends a task with sys.exit
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
            except BaseException:  # noqa: BLE001 - a child must end here, never return to the loop
                log.exception("fedpriv-superexec: the task's process failed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        log.info("fedpriv-superexec: task %s runs in process %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the children that ended (no zombies between tasks)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its code is lost, not its slot
                done, status = pid, None
            if not done:
                continue
            self.children.discard(pid)
            code = os.waitstatus_to_exitcode(status) if status is not None else None
            if code is not None:
                self.ended.append(code)
            if code:
                log.warning("fedpriv-superexec: process %d ended with code %s (its task's status says why)", pid, code)

    def close(self) -> None:
        self.reconcile()


def serve(
    runtime_api_address: str,
    *,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
    poll_s: float = POLL_S,
) -> None:
    """Warm up, then take the SuperNode's ClientApp tasks until stopped or the SuperNode ends."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.executor import LaunchResultStatus
    from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    class ClientAppPlugin(BaseExecPlugin):
        supported_task_types = frozenset({TaskType.CLIENT_APP})

    started = time.monotonic()
    warm_up()
    log.info("fedpriv-superexec: warm in %.1f s (pid %d)", time.monotonic() - started, os.getpid())
    executor = ForkExecutor()
    plugin = ClientAppPlugin(runtime_api_address, insecure, root_certificates_path, False, executor=executor)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # SIGINT here when the SuperNode is gone
    try:
        while True:
            executor.reconcile()
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=plugin.supported_task_types, agentapp_fab_hashes=set())
            )
            if reply.HasField("task") and reply.token:
                result = plugin.launch_task(token=reply.token, task=reply.task)
                if result.status != LaunchResultStatus.ACCEPTED:
                    log.warning("fedpriv-superexec: task %s not started: %s", reply.task.task_id, result.message)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        log.info("fedpriv-superexec: stopped")
    finally:
        client.close()
        executor.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedpriv-superexec", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback)")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) ends")
    p.add_argument("--poll-interval", type=float, default=POLL_S, help=f"seconds between asks (default {POLL_S})")
    args = p.parse_args(argv)
    if not args.insecure and not args.root_certificates:
        p.error("--root-certificates is required unless --insecure")
    if not 0.005 <= args.poll_interval <= 60:
        p.error("--poll-interval must be between 0.005 and 60 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        poll_s=args.poll_interval,
    )


if __name__ == "__main__":
    main()
