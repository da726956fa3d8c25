"""The run configuration, composed by Hydra from fedpriv's packaged ``conf/``.

``conf/`` ships as the package ``fedpriv_conf`` (pyproject's package-dir and package
data), so a wheel installed anywhere carries it; both ``fedpriv simulate`` (a Hydra main)
and ``compose_config`` (``flwr run``, ``fedpriv audit``, the tests) read it through
Hydra's package search path, ``CONF``. In a checkout ``server.runtime.pinning.pin`` maps the
name to the ``conf/`` folder beside ``server/``.
"""

from __future__ import annotations

from pathlib import Path

from server.runtime.pinning import CONF_PACKAGE, pin

#: Hydra's search path for fedpriv's configuration.
CONF = f"pkg://{CONF_PACKAGE}"


def conf_path() -> str:
    """``CONF``, with ``fedpriv_conf`` importable from the tree this code came from."""
    pin()
    return CONF


def compose_config(overrides: list[str], base: Path | None = None) -> tuple[dict, Path]:
    """(resolved config, run directory) for ``overrides`` without a Hydra main (``flwr run``).

    A relative ``hydra.run.dir`` is taken relative to ``base`` (default: the current
    directory), before ``${hydra:run.dir}`` resolves, so that every path agrees.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    conf_path()
    with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
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
