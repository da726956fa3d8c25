"""The fedpriv ServerApp: a thin Flower entry point around the round loop and the run's end
(``server.runtime.serve.federate``); ``server.app:app`` is the one Flower loads.

``fedpriv simulate`` builds it with the already validated config (``make_app``);
``flwr run`` loads ``app`` (pyproject's [tool.flwr.app.components]) and composes the config
from the run-config key ``overrides`` (Hydra override strings, space-separated; see
``server.runtime.deployment``), on real SuperNodes or on a SuperLink's local simulation (its
in-memory Grid). There the run directory and the report are announced through Flower's
logger: its lines are what ``flwr run --stream`` and ``flwr log`` show of the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.common import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from common.rundir import RunDir
from server.round.loop import Prepared
from server.runtime.deployment import (
    check_simulated_nodes,
    deployment_config,
    prepare_deployment,
)
from server.runtime.serve import SPEC_KEY, federate, load_spec, serve

logging.getLogger("flwr").propagate = False  # Flower logs would reach Hydra's handlers twice


def make_app(
    prepared: Prepared | None = None,
    run_dir: Path | None = None,
    errors: list[BaseException] | None = None,
    *,
    resume: bool = False,
    window: int | None = None,
) -> ServerApp:
    """A ServerApp bound to a prepared config, or composing one from the run config.

    ``window``: messages in flight at a time (``server.round.dispatch``), for the bound config.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            spec = context.run_config.get(SPEC_KEY)
            if prepared is None and spec and isinstance(grid, InMemoryGrid):
                serve(load_spec(str(spec)), grid)  # `fedpriv simulate simulation.runtime=superlink`
            elif prepared is None:  # `flwr run`: Flower's SuperLink, real or simulated SuperNodes
                simulated = isinstance(grid, InMemoryGrid)
                cfg, target = deployment_config(str(context.run_config.get("overrides", "")), simulated=simulated)
                flwr_log(logging.INFO, "fedpriv: run directory %s", target)
                ready = prepare_deployment(cfg)
                if simulated:  # the engine registers its nodes while this thread prepares
                    check_simulated_nodes(cfg, list(grid.get_node_ids()))
                federate(grid, ready, target)
                flwr_log(logging.INFO, "fedpriv: privacy report %s", RunDir(target).report_md)
            else:
                federate(grid, prepared, run_dir, resume=resume, window=window)
        except BaseException as err:  # the simulation engine would only log it
            if errors is not None:
                errors.append(err)
            raise

    return app
