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
from flwr.app import Message
from flwr.serverapp import Grid
from omegaconf import OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.accounting import check_pins
from common.config import validate, validate_partitions
from common.data import load_splits, partition_train, tokenize
from common.features import pooled_features
from common.errors import ConfigError
from common.model import count_parameters, instantiate_model, load_tokenizer, load_trainable, trainable_state
from common.protocol import TrainInstruction
from common.recipe import check_model, round_aggregation, stage_of
from common.report import build_report, write_report
from common.storage import append_json_line, atomic_write_bytes, atomic_write_json
from server.aggregate import Reply, aggregate, collect
from server.checkpoint import (
    Manifest,
    completed_rounds,
    load_optimizer_state,
    load_round,
    save_round,
    truncate_metrics,
)
from server.evaluate import evaluate, evaluate_head
from common.mechanism import ClientLevelDP
from server.optimizer import ServerOptimizer, server_optimizer
from server.secagg import secagg_round

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the server needs before round 1, computed once and validated."""

    cfg: dict
    label_names: list[str]
    test: torch.utils.data.TensorDataset
    partition_sizes: list[int]
    model: torch.nn.Module
    test_features: torch.utils.data.TensorDataset | None = None  # the recipe's head rounds; computed once

    def head_test_features(self, global_state) -> torch.utils.data.TensorDataset:
        """The test set's pooled features through the frozen encoder (computed at first use)."""
        if self.test_features is None:
            log.info("computing the pooled features of the %d test examples (once)", len(self.test))
            load_trainable(self.model, global_state)
            self.test_features = pooled_features(self.model, self.test,
                                                 batch_size=max(int(self.cfg["evaluation"]["batch_size"]), 128))
        return self.test_features


def prepare(cfg: dict) -> Prepared:
    """Validate the config, the data split and the model; raises ConfigError before any training."""
    validate(cfg)
    train, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    parts = partition_train(train, cfg["partition"], num_clients=int(cfg["num_clients"]), seed=int(cfg["seed"]))
    sizes = [len(p) for p in parts]
    for note in validate_partitions(cfg, sizes):
        log.warning(note)
    check_simulated_ledgers(cfg)
    tokenizer = load_tokenizer(cfg["model"])
    try:
        model = instantiate_model(cfg, len(labels))
    except Exception as err:
        cause = err if isinstance(err, ConfigError) else err.__cause__  # Hydra wraps factory errors
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError("model", f"cannot build the model: {err}") from err
    check_model(cfg, model)
    return Prepared(cfg, labels, tokenize(test, tokenizer, int(cfg["train"]["max_length"])), sizes, model)


def check_simulated_ledgers(cfg: dict) -> None:
    """Simulation: refuse a δ or accountant other than the one the clients' ledgers are pinned to.

    Simulated clients keep their ledgers on this machine (``state_dir/<id>/ledger.json``,
    DESIGN.md), so the run is refused here, naming the setting and the ledger's value,
    before any client trains. Devices check their own ledger (and decline) in deployment.
    """
    state_dir = cfg.get("state_dir")
    if cfg["privacy"]["mode"] not in ("sample", "both") or not state_dir:
        return
    sample = cfg["privacy"]["sample"]
    for client_id in range(int(cfg["num_clients"])):
        path = Path(state_dir) / str(client_id) / "ledger.json"
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        if stored.get("history"):
            check_pins(stored.get("delta"), stored.get("accountant"), float(sample["delta"]), sample["accountant"])


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
    unreported: dict[str, list[int]]  # client id -> rounds whose reply never arrived

    @classmethod
    def fresh(cls, run_dir: Path, model: torch.nn.Module, optimizer: ServerOptimizer) -> "RunState":
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run; use resume={run_dir} to continue it")
        state = cls(uuid.uuid4().hex, Manifest(""), trainable_state(model), [], {}, {})
        state.manifest.run_id = state.run_id
        state.save(run_dir, 0, optimizer)  # resume point before round 1
        return state

    def save(self, run_dir: Path, server_round: int, optimizer: ServerOptimizer) -> None:
        """Checkpoint the global weights and, for a stateful server optimizer, its state."""
        save_round(run_dir, self.manifest, server_round, self.global_state,
                   optimizer_state=optimizer.state_dict() if optimizer.stateful else None,
                   optimizer_name=optimizer.name)

    @classmethod
    def resumed(cls, run_dir: Path) -> "RunState":
        manifest = Manifest.load(run_dir)
        rounds = completed_rounds(run_dir)
        truncate_metrics(run_dir, rounds)
        done = len(rounds)
        reported_path = run_dir / "clients_reported.json"
        reported = json.loads(reported_path.read_text()) if reported_path.exists() else {}
        log.info("resuming run %s after round %d", manifest.run_id, done)
        return cls(manifest.run_id, manifest, load_round(run_dir, manifest, done), rounds,
                   reported.get("clients", {}), reported.get("unreported", {}))

    def reported(self) -> dict:
        """The clients_reported.json object: what clients said, and whose replies are missing."""
        return {"run_id": self.run_id, "clients": self.clients_reported, "unreported": self.unreported}


def run_federation(grid: Grid, prepared: Prepared, run_dir: Path, *, resume: bool = False) -> dict:
    """Run (or continue) every round and write the run directory; returns the privacy report."""
    cfg, model = prepared.cfg, prepared.model
    run_dir.mkdir(parents=True, exist_ok=True)
    # strategy.name: how each round's released step moves the global model (server.optimizer).
    optimizer = server_optimizer(cfg["strategy"])
    if resume:
        state = RunState.resumed(run_dir)  # keeps the original .hydra/config.yaml
        if optimizer.stateful:  # momentum / moments exactly as after the last completed round
            optimizer.load_state_dict(load_optimizer_state(run_dir, state.manifest, len(state.rounds),
                                                           optimizer_name=optimizer.name))
    else:
        # DESIGN.md: .hydra/config.yaml holds the *resolved* config (Hydra writes it with
        # interpolations such as ${hydra:run.dir}); resume and `fedpriv report` read it.
        atomic_write_bytes(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
        state = RunState.fresh(run_dir, model, optimizer)
    cfg_json = json.dumps(cfg)
    trainable, total = count_parameters(model)
    log.info("model: %d of %d parameters train and travel (%.2f%%)", trainable, total, 100 * trainable / total)

    nodes = _wait_for_nodes(grid, int(cfg["num_clients"]), float(cfg["node_wait_s"]))
    sampler = random.SystemRandom()  # who trains is not predictable from the config
    strategy = cfg["strategy"]
    max_norm = strategy.get("max_update_norm")
    n_rounds = int(cfg["rounds"])
    first = len(state.rounds) + 1
    node_clients: dict[int, str] = {}  # Flower node id -> client id, learnt from replies
    client_dp = ClientLevelDP(cfg) if cfg["privacy"]["mode"] in ("client", "both") else None
    if client_dp is not None and resume:
        client_dp.restore(run_dir, completed_rounds=first - 1)

    with Progress(TextColumn("[bold]fedpriv[/] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn()) as progress:
        task = progress.add_task("training", total=n_rounds, completed=first - 1)
        for server_round in range(first, n_rounds + 1):
            if client_dp is not None and client_dp.next_round_exceeds_budget(server_round):
                log.warning("stopping before round %d: %s", server_round, client_dp.stopped["reason"])
                break  # the last model is kept; the report is written below
            started = time.monotonic()
            k = max(1, round(float(strategy["fraction_train"]) * len(nodes)))
            sampled = sorted(sampler.sample(nodes, k))
            clip_norm = client_dp.clipping_norm if client_dp is not None else None
            instruction = TrainInstruction(state.run_id, server_round, cfg_json, client_clip_norm=clip_norm)
            stage = stage_of(cfg, server_round)
            # The prototype round's reply is the client's class sums, not a step: the update
            # cap (strategy.max_update_norm) is for steps; client-level DP's C still holds.
            norm_caps = [c for c in (clip_norm, max_norm if stage != "prototypes" else None) if c is not None]
            if cfg["secagg"]:
                # The server only ever holds the sum; the checks ran on each client before masking.
                result = secagg_round(grid, sampled, state.global_state, instruction, server_round=server_round,
                                      settings=cfg["secaggplus"], timeout=float(cfg["round_timeout_s"]),
                                      clipping_range=clip_norm or float(cfg["secaggplus"]["clipping_range"]))
            else:
                content = instruction.to_content(state.global_state)
                messages = [Message(content=content, dst_node_id=node, message_type="train") for node in sampled]
                replies = grid.send_and_receive(messages, timeout=float(cfg["round_timeout_s"]))
                result = collect((Reply.of(m) for m in replies), server_round=server_round, sampled=sampled,
                                 expected=state.global_state,
                                 max_update_norm=float(min(norm_caps)) if norm_caps else None)
            state.clients_reported.update(result.privacy)
            node_clients.update(result.node_clients)
            for node in [*result.missing, *result.failed_nodes]:
                who = node_clients.get(node, f"node {node}")
                state.unreported.setdefault(who, []).append(server_round)

            new_state = None
            if len(result.trained) >= int(strategy["min_train_clients"]):
                new_state = aggregate(state.global_state, result, n_planned=k, client_dp=client_dp,
                                      optimizer=optimizer, server_round=server_round,
                                      **round_aggregation(cfg, server_round, state.global_state))
            skipped = new_state is None
            if skipped:
                log.warning("round %d skipped: %d updates accepted, strategy.min_train_clients=%s",
                            server_round, len(result.trained), strategy["min_train_clients"])
            else:
                state.global_state = new_state
            if client_dp is not None:
                if skipped:  # a released round was accounted by aggregate (common.mechanism.release)
                    client_dp.skip(server_round, clients=len(result.trained))
                # Written before the checkpoint: a crash after it can only over-count.
                client_dp.write(run_dir)  # client_level.json: resume and `fedpriv report` read it
            if stage == "encoder":
                accuracy, loss = evaluate(model, state.global_state, prepared.test,
                                          batch_size=int(cfg["evaluation"]["batch_size"]))
            else:  # the encoder is still the frozen one: its test features are computed once
                accuracy, loss = evaluate_head(model, state.global_state, prepared.head_test_features(state.global_state))

            state.save(run_dir, server_round, optimizer)
            atomic_write_json(run_dir / "clients_reported.json", state.reported())
            record = {
                "round": server_round, "accuracy": accuracy, "loss": loss,
                "clients_trained": len(result.trained), "clients_declined": len(result.declined),
                "clients_rejected": len(result.rejected), "clients_failed": len(result.failed),
                "clients_missing": len(result.missing), "skipped": skipped,
                "declined": result.declined, "rejected": result.rejected, "failed": result.failed,
                "wall_s": round(time.monotonic() - started, 3),
            }
            if result.secure_error is not None:
                record["secagg_error"] = result.secure_error  # the round's, not a client's: not in clients_failed
            append_json_line(run_dir / "metrics.jsonl", record)  # last: the round is complete
            state.rounds.append(record)
            progress.update(task, advance=1, description=(
                f"round {server_round}: accuracy {accuracy:.3f}, trained {len(result.trained)}, "
                f"declined {len(result.declined)}, rejected {len(result.rejected)}"))

    if client_dp is not None:
        client_dp.write(run_dir)  # also when the budget stopped the run before any round
    report = build_report(config=cfg, clients_reported=state.reported(), rounds=state.rounds,
                          client_level=client_dp.block() if client_dp is not None else None)
    write_report(run_dir, report)
    log.info("privacy report: %s", run_dir / "privacy_report.md")
    return report
