"""The run configuration, composed by Hydra from ``conf/`` without a Hydra main.

Its own module, so that ``server.app`` (the ServerApp) and ``server.deployment`` (what
it does under ``flwr run``) do not import each other, and the CLI's audit needs neither.
"""

from __future__ import annotations

from pathlib import Path

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
