"""fedpriv's one round loop over Flower's Grid, for simulation and deployment alike.

``Strategy.start`` cannot resume and hides replies before aggregation, so the loop
is ours: sample → send → check (server.aggregate) → average → evaluate →
checkpoint → ``metrics.jsonl`` → report. Per round the checkpoint is durable
before the round's metrics line is appended, so a line in ``metrics.jsonl``
always means "this round is complete and saved", and a resumed run starts after
the last such line with the same run id: clients that already answered the
interrupted round resend their kept reply instead of spending ε again.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import validate, validate_partitions
from common.data import load_splits, partition_train, tokenize
from common.errors import ConfigError
from common.model import count_parameters, instantiate_model, load_tokenizer, trainable_state
from common.report import build_report, write_report
from common.storage import append_json_line, atomic_write_bytes, atomic_write_json
from server.aggregate import Reply, collect, fedavg
from server.checkpoint import Manifest, completed_rounds, load_round, save_round, truncate_metrics
from server.evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the server needs before round 1, computed once and validated."""

    cfg: dict
    label_names: list[str]
    test: torch.utils.data.TensorDataset
    partition_sizes: list[int]
    model: torch.nn.Module


def prepare(cfg: dict) -> Prepared:
    """Validate the config, the data split and the model; raises ConfigError before any training."""
    validate(cfg)
    train, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    parts = partition_train(train, cfg["partition"], num_clients=int(cfg["num_clients"]), seed=int(cfg["seed"]))
    sizes = [len(p) for p in parts]
    for note in validate_partitions(cfg, sizes):
        log.warning(note)
    tokenizer = load_tokenizer(cfg["model"])
    try:
        model = instantiate_model(cfg, len(labels))
    except Exception as err:
        cause = err if isinstance(err, ConfigError) else err.__cause__  # Hydra wraps factory errors
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError("model", f"cannot build the model: {err}") from err
    return Prepared(cfg, labels, tokenize(test, tokenizer, int(cfg["train"]["max_length"])), sizes, model)


def _wait_for_nodes(grid: Grid, wanted: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of num_clients={wanted} nodes connected "
                               f"within node_wait_s={wait_s:.0f}")
        time.sleep(1.0)


@dataclass
class RunState:
    """Where a run stands: enough to continue it after a crash."""

    run_id: str
    manifest: Manifest
    global_state: dict[str, torch.Tensor]
    rounds: list[dict]  # metrics.jsonl records of completed rounds
    clients_reported: dict[str, dict]

    @classmethod
    def fresh(cls, run_dir: Path, model: torch.nn.Module) -> "RunState":
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run; use resume={run_dir} to continue it")
        state = cls(uuid.uuid4().hex, Manifest(""), trainable_state(model), [], {})
        state.manifest.run_id = state.run_id
        save_round(run_dir, state.manifest, 0, state.global_state)  # resume point before round 1
        return state

    @classmethod
    def resumed(cls, run_dir: Path) -> "RunState":
        manifest = Manifest.load(run_dir)
        rounds = completed_rounds(run_dir)
        truncate_metrics(run_dir, rounds)
        done = len(rounds)
        reported_path = run_dir / "clients_reported.json"
        reported = json.loads(reported_path.read_text())["clients"] if reported_path.exists() else {}
        log.info("resuming run %s after round %d", manifest.run_id, done)
        return cls(manifest.run_id, manifest, load_round(run_dir, manifest, done), rounds, reported)


def run_federation(grid: Grid, prepared: Prepared, run_dir: Path, *, resume: bool = False) -> dict:
    """Run (or continue) every round and write the run directory; returns the privacy report."""
    cfg, model = prepared.cfg, prepared.model
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state = RunState.resumed(run_dir)  # keeps the original .hydra/config.yaml
    else:
        # DESIGN.md: .hydra/config.yaml holds the *resolved* config (Hydra writes it with
        # interpolations such as ${hydra:run.dir}); resume and `fedpriv report` read it.
        atomic_write_bytes(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
        state = RunState.fresh(run_dir, model)
    cfg_json = json.dumps(cfg)
    trainable, total = count_parameters(model)
    log.info("model: %d of %d parameters train and travel (%.2f%%)", trainable, total, 100 * trainable / total)

    nodes = _wait_for_nodes(grid, int(cfg["num_clients"]), float(cfg["node_wait_s"]))
    sampler = random.SystemRandom()  # who trains is not predictable from the config
    strategy = cfg["strategy"]
    max_norm = strategy.get("max_update_norm")
    n_rounds = int(cfg["rounds"])
    first = len(state.rounds) + 1

    with Progress(TextColumn("[bold]fedpriv[/] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn()) as progress:
        task = progress.add_task("training", total=n_rounds, completed=first - 1)
        for server_round in range(first, n_rounds + 1):
            started = time.monotonic()
            k = max(1, round(float(strategy["fraction_train"]) * len(nodes)))
            sampled = sorted(sampler.sample(nodes, k))
            content = RecordDict({
                "arrays": ArrayRecord(torch_state_dict=state.global_state),
                "config": ConfigRecord({"run-id": state.run_id, "server-round": server_round,
                                        "fedpriv-config": cfg_json}),
            })
            messages = [Message(content=content, dst_node_id=node, message_type="train") for node in sampled]
            replies = grid.send_and_receive(messages, timeout=float(cfg["round_timeout_s"]))
            result = collect((Reply.of(m) for m in replies), server_round=server_round, sampled=sampled,
                             expected=state.global_state,
                             max_update_norm=float(max_norm) if max_norm is not None else None)
            state.clients_reported.update(result.privacy)

            skipped = len(result.accepted) < int(strategy["min_train_clients"])
            if skipped:
                log.warning("round %d skipped: %d updates accepted, strategy.min_train_clients=%s",
                            server_round, len(result.accepted), strategy["min_train_clients"])
            else:
                state.global_state = fedavg(state.global_state, result.accepted, server_lr=float(strategy["server_lr"]))
            accuracy, loss = evaluate(model, state.global_state, prepared.test,
                                      batch_size=int(cfg["evaluation"]["batch_size"]))

            save_round(run_dir, state.manifest, server_round, state.global_state)
            atomic_write_json(run_dir / "clients_reported.json",
                              {"run_id": state.run_id, "clients": state.clients_reported})
            record = {
                "round": server_round, "accuracy": accuracy, "loss": loss,
                "clients_trained": len(result.accepted), "clients_declined": len(result.declined),
                "clients_rejected": len(result.rejected), "clients_failed": len(result.failed),
                "clients_missing": len(result.missing), "skipped": skipped,
                "declined": result.declined, "rejected": result.rejected, "failed": result.failed,
                "wall_s": round(time.monotonic() - started, 3),
            }
            append_json_line(run_dir / "metrics.jsonl", record)  # last: the round is complete
            state.rounds.append(record)
            progress.update(task, advance=1, description=(
                f"round {server_round}: accuracy {accuracy:.3f}, trained {len(result.accepted)}, "
                f"declined {len(result.declined)}, rejected {len(result.rejected)}"))

    report = build_report(config=cfg, clients_reported={"run_id": state.run_id, "clients": state.clients_reported},
                          rounds=state.rounds)
    write_report(run_dir, report)
    log.info("privacy report: %s", run_dir / "privacy_report.md")
    return report
