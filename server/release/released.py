"""The released model of a finished run, read back from its run directory.

What leaves fedpriv (``fedpriv export``, ``explain``, ``predict``) is built from this
and nothing else: the run's resolved config (``.hydra/config.yaml``), the global
trainable weights of one round from ``checkpoints/`` (verified against the manifest's
SHA-256, as resume verifies them) and the model that config builds. No client data is
read; the label names come from the data config's own reader (``data.labels`` in a
deployment run), exactly as the run derived them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch

from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import load_trainable
from common.rundir import RunDir
from server.round.checkpoint import CheckpointError, Manifest, load_round

if TYPE_CHECKING:
    from server.round.loop import RunEnd


@dataclass
class Released:
    run_dir: Path
    cfg: dict
    server_round: int
    model: torch.nn.Module  # eval mode, the round's trainable weights loaded
    tokenizer: object
    label_names: list[str]
    checkpoint_sha256: str  # the manifest's hash of the loaded checkpoint
    test: datasets.Dataset | None  # the run's server-side test split, read with the labels (one read of the data)

    @classmethod
    def at_end(cls, end: RunEnd) -> Released:
        """The released model of a run that just ended, from what its round loop holds in memory:
        what :func:`load_released` would read back, without reading the data or building the model again."""
        prepared = end.prepared
        if prepared.tokenizer is None or prepared.test_split is None:
            raise ValueError("the run's end holds no tokenizer or test texts to explain")
        load_trainable(prepared.model, end.global_state)
        prepared.model.eval()
        return cls(
            Path(end.run_dir),
            prepared.cfg,
            end.server_round,
            prepared.model,
            prepared.tokenizer,
            list(prepared.label_names),
            end.checkpoint_sha256,
            prepared.test_split,
        )

    def test_split(self) -> datasets.Dataset:
        """The run's server-side test split as text: ``text`` and ``label`` (an index into label_names)."""
        return self.test

    def test_set(self) -> torch.utils.data.TensorDataset:
        """The run's server-side test split, tokenized as the run evaluated it."""
        return tokenize(self.test_split(), self.tokenizer, int(self.cfg["train"]["max_length"]))


def run_config(run_dir: Path) -> dict:
    run = RunDir(run_dir)
    if not run.is_run():
        raise FileNotFoundError(f"{run.config_file} is missing: {run_dir} is not a fedpriv run directory")
    return run.config()


def load_released(run_dir: str | Path, server_round: int | None = None) -> Released:
    """The global model after ``server_round`` (default: the last checkpointed round)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg["task"] == "token_classification":
        raise ConfigError(
            "task",
            "explain, export and predict read sequence classifiers; a "
            "token_classification run's model is in its checkpoints but not yet exported",
        )
    manifest = Manifest.load(run_dir)
    if not manifest.rounds:
        raise CheckpointError(f"{RunDir(run_dir).checkpoints} holds no round")
    chosen = max(manifest.rounds) if server_round is None else int(server_round)
    if chosen not in manifest.rounds:
        raise CheckpointError(
            f"no checkpoint of round {chosen} in {RunDir(run_dir).checkpoints} "
            f"(rounds {min(manifest.rounds)}..{max(manifest.rounds)})"
        )
    state = load_round(run_dir, manifest, chosen)
    _, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    model = instantiate_model(cfg, len(labels))
    load_trainable(model, state)
    model.eval()
    return Released(
        run_dir, cfg, chosen, model, load_tokenizer(cfg["model"]), list(labels), manifest.rounds[chosen]["sha256"], test
    )
