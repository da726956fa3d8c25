"""What the ServerApp does differently under ``flwr run`` (Flower's own SuperLink).

The round loop is the same as in simulation; only the config and the data the
server holds differ:

- The config comes from the run-config key ``overrides`` (Hydra override strings).
  The ServerApp process runs wherever the SuperLink started it, so a relative
  ``hydra.run.dir`` would land in the SuperLink's working directory: it is placed
  under ``$FEDPRIV_RUNS_DIR`` (default ``~/fedpriv``) instead, and the absolute
  path is logged. Give ``hydra.run.dir=/absolute/path`` to choose it.
- The server never holds client ledgers: ``state_dir`` is dropped from the run
  config unless given explicitly in ``overrides``; each SuperNode then needs its
  own node-config ``state-dir``. A ``flwr run`` on a local simulation (a SuperLink
  started with ``--simulation``) is the exception: server and simulated clients
  share one machine, as in ``fedpriv simulate``, so ``state_dir`` keeps its default
  ``<run dir>/clients``, and the number of simulated SuperNodes must be
  ``num_clients`` (their data partitions are cut by that number).
- Devices may hold their own training files (node-config ``data-path``), so the
  server may have no ``data.path``. It then needs only what it evaluates on,
  ``data.test_path``, and the run's classes, ``data.labels``. In every case the
  run config it sends carries ``data.labels``, so every device encodes its labels
  the same way.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from common.config.validate import validate
from common.data.sources import load_local_data
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from common.model.factory import instantiate_model, load_tokenizer
from common.recipe import check_model
from server.round.loop import Prepared, prepare
from server.runtime.compose import compose_config

log = logging.getLogger(__name__)


def runs_base() -> Path:
    """Where a relative ``hydra.run.dir`` goes in deployment."""
    return Path(os.environ.get("FEDPRIV_RUNS_DIR") or Path.home() / "fedpriv").expanduser().resolve()


def deployment_config(overrides: str, *, simulated: bool = False) -> tuple[dict, Path]:
    """(config, absolute run dir) for a ``flwr run`` from its ``overrides`` string;
    ``simulated``: on a local simulation, whose clients keep their ledgers beside the run."""
    args = shlex.split(overrides or "")
    cfg, run_dir = compose_config(args, base=runs_base())
    if not simulated and not any(a.lstrip("+~").startswith("state_dir=") for a in args):
        cfg["state_dir"] = None  # ledgers live on the devices (node-config state-dir)
    log.info("fedpriv: run directory %s", run_dir)
    return cfg, run_dir


def check_simulated_nodes(cfg: dict, node_ids: list[int]) -> None:
    """A local simulation's SuperNodes all exist from the start: refuse a count other than
    ``num_clients`` at once, instead of waiting ``node_wait_s`` for nodes that never come
    (fewer) or training on partitions cut for another number of clients (more)."""
    wanted = int(cfg["num_clients"])
    if len(node_ids) != wanted:
        raise ConfigError(
            "num_clients",
            f"is {wanted}, but the local simulation has {len(node_ids)} simulated "
            f'SuperNodes: give `flwr run` --federation-config "num-supernodes={wanted}" '
            f"(or num_clients={len(node_ids)} in overrides)",
        )


def _server_has_training_data(data: dict) -> bool:
    if data["source"] != "csv":
        return True  # synthetic and hf sets are built by the server itself
    path = data["path"]
    return path not in (None, "", "???") and Path(str(path)).expanduser().is_file()


def prepare_deployment(cfg: dict) -> Prepared:
    """Validate and load what the server needs; put the run's labels into ``cfg``."""
    validate(cfg)
    data = cfg["data"]
    if _server_has_training_data(data):
        prepared = prepare(cfg)
    else:
        if not data["labels"]:
            raise ConfigError(
                "data.labels",
                "the server has no training file (data.path), so the run "
                "must list its classes, e.g. 'data.labels=[ham,spam]'",
            )
        if not data["test_path"]:
            raise ConfigError(
                "data.test_path", "the server has no training file (data.path); give it a held-out file to evaluate on"
            )
        test, labels = load_local_data(cfg, data["test_path"], "data.test_path", hold_out=False)  # all of it
        tokenizer = load_tokenizer(cfg["model"])
        log.warning(
            "the server holds no training data: partition checks (delta < 1/n) are left to "
            "the devices' own data; %d test examples",
            len(test),
        )
        prepared = Prepared(
            cfg,
            labels,
            tokenize(test, tokenizer, int(cfg["train"]["max_length"])),
            [],
            instantiate_model(cfg, len(labels)),
            tokenizer=tokenizer,
            test_split=test,
        )
        check_model(cfg, prepared.model)  # before any device is asked to train
    data["labels"] = list(prepared.label_names)
    return prepared
