"""The fedpriv ServerApp: a thin Flower entry point around ``server.loop``.

``fedpriv simulate`` builds it with the already validated config (``make_app``);
``flwr run`` loads ``app`` from pyproject and composes the config from the run-config
key ``overrides`` (Hydra override strings, space-separated).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.deployment import deployment_config, prepare_deployment
from server.loop import Prepared, run_federation

logging.getLogger("flwr").propagate = False  # Flower logs would reach Hydra's handlers twice

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str], base: Path | None = None) -> tuple[dict, Path]:
    """(resolved config, run directory) for ``overrides`` without a Hydra main (``flwr run``).

    A relative ``hydra.run.dir`` is taken relative to ``base`` (default: the current
    directory), before ``${hydra:run.dir}`` resolves, so that every path agrees.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        run_dir = ((base or Path.cwd()) / Path(cfg.hydra.run.dir).expanduser()).resolve()
        cfg.hydra.run.dir = str(run_dir)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)  # what a Hydra main sets for its job
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
        with open_dict(cfg):
            del cfg["hydra"]  # its sweep keys only resolve inside a multirun
        container = OmegaConf.to_container(cfg, resolve=True)
    container["state_dir"] = str(((base or Path.cwd()) / Path(container["state_dir"]).expanduser()).resolve())
    return container, run_dir


def make_app(prepared: Prepared | None = None, run_dir: Path | None = None,
             errors: list[BaseException] | None = None, *, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a prepared config, or composing one from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if prepared is None:  # `flwr run`: Flower's SuperLink, real or simulated SuperNodes
                cfg, target = deployment_config(str(context.run_config.get("overrides", "")))
                run_federation(grid, prepare_deployment(cfg), target)
            else:
                run_federation(grid, prepared, run_dir, resume=resume)
        except BaseException as err:  # the simulation engine would only log it
            if errors is not None:
                errors.append(err)
            raise

    return app


app = make_app()
