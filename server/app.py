"""The fedpriv ServerApp: a thin Flower entry point around ``server.loop``.

``fedpriv simulate`` builds it with the already validated config (``make_app``);
``flwr run`` loads ``app`` from pyproject and composes the config from the run-config
key ``overrides`` (Hydra override strings, space-separated).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import Prepared, prepare, run_federation

logging.getLogger("flwr").propagate = False  # Flower logs would reach Hydra's handlers twice

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> tuple[dict, Path]:
    """(resolved config, run directory) for ``overrides`` without a Hydra main (``flwr run``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        run_dir = Path(cfg.hydra.run.dir).resolve()
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)  # what a Hydra main sets for its job
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
        with open_dict(cfg):
            del cfg["hydra"]  # its sweep keys only resolve inside a multirun
        container = OmegaConf.to_container(cfg, resolve=True)
    container["state_dir"] = str(Path(container["state_dir"]).resolve())
    return container, run_dir


def make_app(prepared: Prepared | None = None, run_dir: Path | None = None,
             errors: list[BaseException] | None = None, *, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a prepared config, or composing one from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if prepared is None:
                cfg, target = compose_config(shlex.split(str(context.run_config.get("overrides", ""))))
                run_federation(grid, prepare(cfg), target)
            else:
                run_federation(grid, prepared, run_dir, resume=resume)
        except BaseException as err:  # the simulation engine would only log it
            if errors is not None:
                errors.append(err)
            raise

    return app


app = make_app()
