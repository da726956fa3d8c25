"""fedpriv's one round loop over Flower's Grid, for simulation and deployment alike.

``Strategy.start`` cannot resume and hides replies before aggregation, so the loop
is ours: sample → send → check (server.aggregate) → average → evaluate →
checkpoint → ``metrics.jsonl`` → report. Per round, the checkpoint is durable
before the round's metrics line is appended, so a line in ``metrics.jsonl``
always means "this round is complete and saved".
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import validate, validate_partitions
from common.data import load_splits, partition_train, tokenize
from common.model import count_parameters, instantiate_model, load_tokenizer, trainable_state
from common.report import build_report, write_report
from common.storage import append_json_line, atomic_write_bytes, atomic_write_json
from server.aggregate import aggregate, collect
from server.mechanism import ClientLevelDP
from server.secagg import secagg_round
from server.evaluate import evaluate

log = logging.getLogger(__name__)

NODE_WAIT_S = 120.0  # how long to wait for the federation's nodes to connect


@dataclass
class Prepared:
    """What the server needs before round 1, computed once and validated."""

    cfg: dict
    label_names: list[str]
    test: torch.utils.data.TensorDataset
    partition_sizes: list[int]


def prepare(cfg: dict) -> Prepared:
    """Validate the config and the data split; raises ConfigError before any training."""
    validate(cfg)
    train, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    parts = partition_train(train, cfg["partition"], num_clients=int(cfg["num_clients"]), seed=int(cfg["seed"]))
    sizes = [len(p) for p in parts]
    for note in validate_partitions(cfg, sizes):
        log.warning(note)
    tokenizer = load_tokenizer(cfg["model"])
    return Prepared(cfg, labels, tokenize(test, tokenizer, int(cfg["train"]["max_length"])), sizes)


def _wait_for_nodes(grid: Grid, wanted: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of num_clients={wanted} nodes connected within {NODE_WAIT_S:.0f}s")
        time.sleep(1.0)


def _save_checkpoint(run_dir: Path, server_round: int, state: Mapping[str, torch.Tensor], run_id: str) -> None:
    import hashlib
    import io

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    blob = buf.getvalue()
    ckpt_dir = run_dir / "checkpoints"
    atomic_write_bytes(ckpt_dir / f"round_{server_round:04d}.pt", blob)
    atomic_write_json(ckpt_dir / "latest.json", {
        "run_id": run_id, "round": server_round, "file": f"round_{server_round:04d}.pt",
        "sha256": hashlib.sha256(blob).hexdigest(),
    })


def run_federation(grid: Grid, prepared: Prepared, run_dir: Path) -> dict:
    """Run every round and write the run directory; returns the privacy report."""
    cfg = prepared.cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    # DESIGN.md: .hydra/config.yaml holds the *resolved* config (Hydra writes it with
    # interpolations such as ${hydra:run.dir}); resume and `fedpriv report` read it.
    atomic_write_bytes(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
    run_id = uuid.uuid4().hex
    cfg_json = json.dumps(cfg)

    model = instantiate_model(cfg, len(prepared.label_names))
    global_state = trainable_state(model)
    trainable, total = count_parameters(model)
    log.info("model: %d of %d parameters train and travel (%.2f%%)", trainable, total, 100 * trainable / total)

    nodes = _wait_for_nodes(grid, int(cfg["num_clients"]))
    sampler = random.SystemRandom()  # who trains is not predictable from the config
    clients_reported: dict[str, dict] = {}
    rounds: list[dict] = []
    strategy = cfg["strategy"]
    n_rounds = int(cfg["rounds"])
    client_dp = ClientLevelDP(cfg) if cfg["privacy"]["mode"] in ("client", "both") else None

    with Progress(TextColumn("[bold]fedpriv[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("training", total=n_rounds)
        for server_round in range(1, n_rounds + 1):
            if client_dp is not None and client_dp.next_round_exceeds_budget(server_round):
                log.warning("stopping before round %d: %s", server_round, client_dp.stopped["reason"])
                break  # the last model is kept; the report is written below
            started = time.monotonic()
            k = max(1, round(float(strategy["fraction_train"]) * len(nodes)))
            sampled = sorted(sampler.sample(nodes, k))
            round_config = {"run-id": run_id, "server-round": server_round, "fedpriv-config": cfg_json,
                            **(client_dp.round_config() if client_dp is not None else {})}
            clip_norm = client_dp.clipping_norm if client_dp is not None else None
            if cfg["secagg"]:
                result = secagg_round(grid, sampled, global_state, round_config, server_round=server_round,
                                      settings=cfg["secaggplus"], timeout=float(cfg["round_timeout_s"]),
                                      clipping_range=clip_norm or float(cfg["secaggplus"]["clipping_range"]))
            else:
                content = RecordDict({"arrays": ArrayRecord(torch_state_dict=global_state),
                                      "config": ConfigRecord(round_config)})
                messages = [Message(content=content, dst_node_id=node, message_type="train") for node in sampled]
                replies = grid.send_and_receive(messages, timeout=float(cfg["round_timeout_s"]))
                result = collect(replies, server_round=server_round, sampled={n: str(n) for n in sampled},
                                 expected=global_state, max_norm=clip_norm)
            clients_reported.update(result.privacy)

            skipped = len(result.trained) < int(strategy["min_train_clients"])
            if not skipped:
                new_state = aggregate(global_state, result, server_lr=float(strategy["server_lr"]), n_planned=k,
                                      client_dp=client_dp)
                skipped = new_state is None
                global_state = global_state if new_state is None else new_state
            if client_dp is not None:
                client_dp.record(server_round, released=not skipped, clients=len(result.trained),
                                 clipping_norm=clip_norm)
            accuracy, loss = evaluate(model, global_state, prepared.test, batch_size=int(cfg["evaluation"]["batch_size"]))

            _save_checkpoint(run_dir, server_round, global_state, run_id)
            atomic_write_json(run_dir / "clients_reported.json", {"run_id": run_id, "clients": clients_reported})
            if client_dp is not None:
                client_dp.write(run_dir)  # client_level.json: `fedpriv report` re-renders from it
            record = {
                "round": server_round, "accuracy": accuracy, "loss": loss,
                "clients_trained": len(result.trained), "clients_declined": len(result.declined),
                "clients_rejected": len(result.rejected), "clients_failed": len(result.failed),
                "skipped": skipped, "declined": result.declined, "rejected": result.rejected,
                "wall_s": round(time.monotonic() - started, 3),
            }
            append_json_line(run_dir / "metrics.jsonl", record)
            rounds.append(record)
            progress.update(task, advance=1, description=(
                f"round {server_round}: accuracy {accuracy:.3f}, trained {len(result.trained)}, "
                f"declined {len(result.declined)}, rejected {len(result.rejected)}"))

    if client_dp is not None:
        client_dp.write(run_dir)  # also when the budget stopped the run before any round
    report = build_report(config=cfg, clients_reported={"run_id": run_id, "clients": clients_reported}, rounds=rounds,
                          client_level=client_dp.block() if client_dp is not None else None)
    write_report(run_dir, report)
    log.info("privacy report: %s", run_dir / "privacy_report.md")
    return report
