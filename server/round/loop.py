"""fedpriv's one round loop over Flower's Grid, for simulation and deployment alike.

``Strategy.start`` cannot resume and hides replies before aggregation, so the loop
is ours: sample → send → check (server.round.aggregate) → average → evaluate →
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from omegaconf import OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config.validate import personal_on, validate, validate_partitions
from common.data.features import frozen_features
from common.data.partition import client_partitions, split_client
from common.data.sources import load_splits
from common.data.tokenizing import align_words, tokenize
from common.errors import ConfigError
from common.model.factory import instantiate_model, load_tokenizer
from common.model.state import count_parameters, load_trainable, trainable_state
from common.privacy.accounting import check_pins
from common.privacy.distributed import DistributedNoise, distributed
from common.privacy.mechanism import ClientLevelDP
from common.protocol import TrainInstruction
from common.recipe import check_model, round_aggregation, stage_of
from common.report import build_report, read_client_evaluation, read_evaluation, round_epsilons, write_report
from common.rundir import RunDir
from common.storage import append_json_line, atomic_write_bytes, atomic_write_json
from server.round.aggregate import Reply, RoundReplies, aggregate, collect
from server.round.checkpoint import (
    Manifest,
    completed_rounds,
    load_optimizer_state,
    load_round,
    save_round,
    truncate_metrics,
)
from server.round.devices import ask_devices, collect_simulated, due
from server.round.dispatch import send_and_receive
from server.round.evaluate import Evaluation, HeldOutWords, TokenEvaluation, evaluate, evaluate_head
from server.round.optimizer import ServerOptimizer, server_optimizer
from server.round.secagg import secagg_round

log = logging.getLogger(__name__)

#: Called after each completed round (its ``metrics.jsonl`` line is written) with that record
#: and the report's ε figures after it (``common.report.round_epsilons``): an experiment
#: tracker's hook (server.runtime.serve builds it). Whatever it raises, the run goes on.
RoundObserver = Callable[[dict, dict], None]


@dataclass
class Prepared:
    """What the server needs before round 1, computed once and validated."""

    cfg: dict
    label_names: list[str]
    test: torch.utils.data.TensorDataset
    partition_sizes: list[int]
    model: torch.nn.Module
    test_features: torch.utils.data.TensorDataset | None = None  # the recipe's head rounds; computed once
    words: HeldOutWords | None = None  # token classification: the test sentences' words and gold tags
    # What explaining the released model at the run's end needs (server.runtime.serve), kept
    # so that the data is not read and the model not built a second time.
    tokenizer: object | None = None
    test_split: datasets.Dataset | None = None  # the test split as text: ``text`` and ``label``

    def head_test_features(self, global_state) -> torch.utils.data.TensorDataset:
        """The test set's features through the frozen encoder (computed at first use)."""
        if self.test_features is None:
            log.info("computing the frozen features of the %d test examples (once)", len(self.test))
            load_trainable(self.model, global_state)
            self.test_features = frozen_features(self.model, self.test)
        return self.test_features


def held_out_inputs(
    cfg: dict, test, tokenizer, label_names: list[str]
) -> tuple[torch.utils.data.TensorDataset, HeldOutWords | None]:
    """The server's test inputs, and for tagged sentences their words (to score on words)."""
    max_length = int(cfg["train"]["max_length"])
    if "tokens" not in test.column_names:
        return tokenize(test, tokenizer, max_length), None
    aligned = align_words(test, tokenizer, max_length, label_names)
    return aligned.dataset(), HeldOutWords(aligned, [list(t) for t in test["tags"]])


def prepare(cfg: dict) -> Prepared:
    """Validate the config, the data split and the model; raises ConfigError before any training."""
    validate(cfg)
    train, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    parts = client_partitions(train, cfg)
    sizes = [len(split_client(cfg, p, i)[0]) for i, p in enumerate(parts)]  # what each client trains on
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
    data, words = held_out_inputs(cfg, test, tokenizer, labels)
    return Prepared(cfg, labels, data, sizes, model, words=words, tokenizer=tokenizer, test_split=test)


def check_simulated_ledgers(cfg: dict) -> None:
    """Simulation: refuse a δ or accountant other than the one the clients' ledgers are pinned to.

    Simulated clients keep their ledgers on this machine (``state_dir/<id>/ledger.json``,
    DESIGN.md), so the run is refused here, naming the setting and the ledger's value,
    before any client trains. Devices check their own ledger (and decline) in deployment.
    """
    state_dir = cfg["state_dir"]
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
            raise TimeoutError(
                f"only {len(nodes)} of num_clients={wanted} nodes connected within node_wait_s={wait_s:.0f}"
            )
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
        if RunDir(run_dir).metrics.exists():
            raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run; use resume={run_dir} to continue it")
        state = cls(uuid.uuid4().hex, Manifest(""), trainable_state(model), [], {}, {})
        state.manifest.run_id = state.run_id
        state.save(run_dir, 0, optimizer)  # resume point before round 1
        return state

    def save(self, run_dir: Path, server_round: int, optimizer: ServerOptimizer) -> None:
        """Checkpoint the global weights and, for a stateful server optimizer, its state."""
        save_round(
            run_dir,
            self.manifest,
            server_round,
            self.global_state,
            optimizer_state=optimizer.state_dict() if optimizer.stateful else None,
            optimizer_name=optimizer.name,
        )

    @classmethod
    def resumed(cls, run_dir: Path) -> "RunState":
        manifest = Manifest.load(run_dir)
        rounds = completed_rounds(run_dir)
        truncate_metrics(run_dir, rounds)
        done = len(rounds)
        reported_path = RunDir(run_dir).clients_reported
        reported = json.loads(reported_path.read_text()) if reported_path.exists() else {}
        log.info("resuming run %s after round %d", manifest.run_id, done)
        return cls(
            manifest.run_id,
            manifest,
            load_round(run_dir, manifest, done),
            rounds,
            reported.get("clients", {}),
            reported.get("unreported", {}),
        )

    def reported(self) -> dict:
        """The clients_reported.json object: what clients said, and whose replies are missing."""
        return {"run_id": self.run_id, "clients": self.clients_reported, "unreported": self.unreported}


def progress_display(*, disable: bool = False) -> Progress:
    """The one progress display of rounds (here, or in ``fedpriv simulate`` for server.runtime.superlink)."""
    return Progress(
        TextColumn("[bold]fedpriv[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        disable=disable,
    )


def round_progress(record: dict) -> str:
    """The progress display's line for a finished round (its ``metrics.jsonl`` record)."""
    return (
        f"round {record['round']}: accuracy {record['accuracy']:.3f}, trained {record['clients_trained']}, "
        f"declined {record['clients_declined']}, rejected {record['clients_rejected']}"
    )


@dataclass
class RunEnd:
    """A finished run as the loop leaves it: its report, and the released model in memory
    (``global_state`` of ``server_round``, its last checkpoint, for ``prepared.model``)."""

    report: dict
    run_dir: Path
    prepared: Prepared
    server_round: int
    checkpoint_sha256: str  # the manifest's hash of that round's checkpoint
    global_state: dict[str, torch.Tensor]


def run_federation(
    grid: Grid,
    prepared: Prepared,
    run_dir: Path,
    *,
    resume: bool = False,
    window: int | None = None,
    progress_bar: bool = True,
) -> dict:
    """:func:`run_rounds`' privacy report: the round loop alone, for callers with no use for its end."""
    return run_rounds(grid, prepared, run_dir, resume=resume, window=window, progress_bar=progress_bar).report


def run_rounds(
    grid: Grid,
    prepared: Prepared,
    run_dir: Path,
    *,
    resume: bool = False,
    window: int | None = None,
    progress_bar: bool = True,
    observer: RoundObserver | None = None,
) -> RunEnd:
    """Run (or continue) every round and write the run directory and its privacy report.

    ``window``: at most this many of a round's messages unanswered at a time
    (``server.round.dispatch``; None: all at once). ``progress_bar``: False where another process
    shows the rounds (``server.runtime.superlink``). ``observer``: see :data:`RoundObserver`. What
    the run's end does with the model (the explanation page) is the runtime's
    (``server.runtime.serve.federate``).
    """
    cfg, model = prepared.cfg, prepared.model
    run_dir.mkdir(parents=True, exist_ok=True)
    # strategy.name: how each round's released step moves the global model (server.round.optimizer).
    optimizer = server_optimizer(cfg["strategy"])
    if resume:
        state = RunState.resumed(run_dir)  # keeps the original .hydra/config.yaml
        if optimizer.stateful:  # momentum / moments exactly as after the last completed round
            optimizer.load_state_dict(
                load_optimizer_state(run_dir, state.manifest, len(state.rounds), optimizer_name=optimizer.name)
            )
    else:
        # DESIGN.md: .hydra/config.yaml holds the *resolved* config (Hydra writes it with
        # interpolations such as ${hydra:run.dir}); resume and `fedpriv report` read it.
        atomic_write_bytes(RunDir(run_dir).config_file, OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
        state = RunState.fresh(run_dir, model, optimizer)
    trainable, total = count_parameters(model)
    log.info("model: %d of %d parameters train and travel (%.2f%%)", trainable, total, 100 * trainable / total)

    nodes = _wait_for_nodes(grid, int(cfg["num_clients"]), float(cfg["node_wait_s"]))
    first, n_rounds = len(state.rounds) + 1, int(cfg["rounds"])
    client_dp = ClientLevelDP(cfg) if cfg["privacy"]["mode"] in ("client", "both") else None
    if client_dp is not None and resume:
        client_dp.restore(RunDir(run_dir).client_level, completed_rounds=first - 1)
    rounds = _Rounds(grid, prepared, run_dir, state, optimizer, client_dp, nodes, window, observer)

    with progress_display(disable=not progress_bar) as progress:
        task = progress.add_task("training", total=n_rounds, completed=first - 1)
        for server_round in range(first, n_rounds + 1):
            if client_dp is not None and client_dp.next_round_exceeds_budget(server_round):
                log.warning("stopping before round %d: %s", server_round, client_dp.stopped["reason"])
                break  # the last model is kept; the report is written below
            record = rounds.run(server_round)
            progress.update(task, advance=1, description=round_progress(record))

    if client_dp is not None:
        client_dp.write(RunDir(run_dir).client_level)  # also when the budget stopped the run before any round
    if personal_on(cfg) and state.rounds:
        rounds.devices_evaluate(len(state.rounds), final=True)
        collect_simulated(cfg, run_dir, state.run_id, server_round=len(state.rounds))
    report = build_report(
        config=cfg,
        clients_reported=state.reported(),
        rounds=state.rounds,
        client_level=client_dp.block() if client_dp is not None else None,
        evaluation=read_evaluation(run_dir),
        client_evaluation=read_client_evaluation(run_dir),
    )
    write_report(run_dir, report)
    log.info("privacy report: %s", RunDir(run_dir).report_md)
    done = len(state.rounds)  # rounds 1..done are checkpointed, and global_state is done's
    return RunEnd(report, run_dir, prepared, done, state.manifest.rounds[done]["sha256"], state.global_state)


@dataclass
class _Rounds:
    """One run's rounds, each in the same order: sample, ask, check, aggregate (noise, adapt,
    account), evaluate, checkpoint, and last the metrics line that marks the round complete."""

    grid: Grid
    prepared: Prepared
    run_dir: Path
    state: RunState
    optimizer: ServerOptimizer
    client_dp: ClientLevelDP | None
    nodes: list[int]
    window: int | None = None  # messages in flight at a time (server.round.dispatch)
    observer: RoundObserver | None = None

    def __post_init__(self) -> None:
        self.cfg = self.prepared.cfg
        self.cfg_json = json.dumps(self.cfg)
        self.sampler = random.SystemRandom()  # who trains is not predictable from the config
        self.noise = DistributedNoise.of(self.cfg) if distributed(self.cfg) else None
        self.node_clients: dict[int, str] = {}  # Flower node id -> client id, learnt from replies

    def run(self, server_round: int) -> dict:
        started = time.monotonic()
        strategy, state, client_dp = self.cfg["strategy"], self.state, self.client_dp
        k = max(1, round(float(strategy["fraction_train"]) * len(self.nodes)))
        sampled = sorted(self.sampler.sample(self.nodes, k))
        result = self._ask(server_round, sampled)
        state.clients_reported.update(result.privacy)
        self.node_clients.update(result.node_clients)
        for node in [*result.missing, *result.failed_nodes]:
            who = self.node_clients.get(node, f"node {node}")
            state.unreported.setdefault(who, []).append(server_round)

        new_state = None
        if len(result.trained) >= int(strategy["min_train_clients"]):
            new_state = aggregate(
                state.global_state,
                result,
                n_planned=k,
                client_dp=client_dp,
                optimizer=self.optimizer,
                server_round=server_round,
                **round_aggregation(self.cfg, server_round, state.global_state),
                exact=self._exact_readout(server_round),
            )
        skipped = new_state is None
        if skipped:
            log.warning(
                "round %d skipped: %d updates accepted, strategy.min_train_clients=%s",
                server_round,
                len(result.trained),
                strategy["min_train_clients"],
            )
        else:
            state.global_state = new_state
        if client_dp is not None:
            if skipped:  # a released round was accounted by aggregate (common.privacy.mechanism.release)
                client_dp.skip(server_round, clients=len(result.trained))
            # Written before the checkpoint: a crash after it can only over-count.
            client_dp.write(RunDir(self.run_dir).client_level)
        evaluation = self._evaluate(server_round)

        state.save(self.run_dir, server_round, self.optimizer)
        atomic_write_json(RunDir(self.run_dir).clients_reported, state.reported())
        record = {
            "round": server_round,
            "accuracy": evaluation.accuracy,
            "loss": evaluation.loss,
            **({"micro_f1": evaluation.micro_f1} if isinstance(evaluation, TokenEvaluation) else {}),
            "macro_f1": evaluation.macro_f1,
            "weighted_f1": evaluation.weighted_f1,
            "clients_trained": len(result.trained),
            "clients_declined": len(result.declined),
            "clients_rejected": len(result.rejected),
            "clients_failed": len(result.failed),
            "clients_missing": len(result.missing),
            "skipped": skipped,
            "declined": result.declined,
            "rejected": result.rejected,
            "failed": result.failed,
            "wall_s": round(time.monotonic() - started, 3),
        }
        if result.secure_error is not None:
            record["secagg_error"] = result.secure_error  # the round's, not a client's: not in clients_failed
        # The per-class block of the model this round leaves, so that after the last round it is
        # the final model's and `fedpriv report` rebuilds it from the run directory. Written
        # before the metrics line: a crash between the two leaves it one round ahead, which a
        # resume overwrites and the report refuses (common.report.build).
        atomic_write_json(RunDir(self.run_dir).evaluation, evaluation.block(self.prepared.label_names, server_round))
        append_json_line(RunDir(self.run_dir).metrics, record)  # last: the round is complete
        state.rounds.append(record)
        self._observe(record)
        if personal_on(self.cfg) and due(self.cfg, server_round, last=int(self.cfg["rounds"])):
            self.devices_evaluate(server_round, final=False)
        return record

    def devices_evaluate(self, server_round: int, *, final: bool) -> dict[str, int]:
        """Every node evaluates the global model on its own held-out part and trains its personal
        model, all kept on the device (server.round.devices); only a flag comes back."""
        return ask_devices(
            self.grid,
            self.nodes,
            self.state.global_state,
            run_id=self.state.run_id,
            server_round=server_round,
            cfg_json=self.cfg_json,
            final=final,
            timeout=float(self.cfg["round_timeout_s"]),
            window=self.window,
        )

    def _observe(self, record: dict) -> None:
        """Tell the observer about the completed round; its failure is a warning, never the run's."""
        if self.observer is None:
            return
        try:
            level = self.client_dp.block() if self.client_dp is not None else None
            self.observer(record, round_epsilons(self.cfg, self.state.reported(), level, record["round"]))
        except Exception:
            log.warning("the round observer failed after round %d; the run goes on", record["round"], exc_info=True)

    def _exact_readout(self, server_round: int) -> dict | None:
        """Distributed noise: how this round's exact integer sum reads back (server.round.aggregate)."""
        if self.noise is None:
            return None
        stage = stage_of(self.cfg, server_round)
        return {
            "units": self.noise.units_per_value(stage),
            "count_units": self.noise.count_units,
            "lr": self.noise.head_lr,
        }

    def _ask(self, server_round: int, sampled: list[int]) -> RoundReplies:
        """Send the round's instruction to ``sampled`` and check what comes back."""
        cfg, state = self.cfg, self.state
        clip_norm = self.client_dp.clipping_norm if self.client_dp is not None else None
        instruction = TrainInstruction(state.run_id, server_round, self.cfg_json, client_clip_norm=clip_norm)
        if cfg["secagg"]:
            # The server only ever holds the sum; the checks ran on each client before masking.
            return secagg_round(
                self.grid,
                sampled,
                state.global_state,
                instruction,
                server_round=server_round,
                settings=cfg["secaggplus"],
                timeout=float(cfg["round_timeout_s"]),
                clipping_range=clip_norm or float(cfg["secaggplus"]["clipping_range"]),
                noise=self.noise,
                stage=stage_of(cfg, server_round),
            )
        # The prototype round's reply is the client's class sums, not a step: the update cap
        # (strategy.max_update_norm) is for steps; client-level DP's C still holds.
        max_norm = cfg["strategy"]["max_update_norm"] if stage_of(cfg, server_round) != "prototypes" else None
        caps = [c for c in (clip_norm, max_norm) if c is not None]
        content = instruction.to_content(state.global_state)
        replies = send_and_receive(
            self.grid,
            sampled,
            lambda node: Message(content=content, dst_node_id=node, message_type="train"),
            timeout=float(cfg["round_timeout_s"]),
            window=self.window,
        )
        return collect(
            (Reply.of(m) for m in replies),
            server_round=server_round,
            sampled=sampled,
            expected=state.global_state,
            max_update_norm=float(min(caps)) if caps else None,
        )

    def _evaluate(self, server_round: int) -> Evaluation | TokenEvaluation:
        prepared, global_state = self.prepared, self.state.global_state
        words = {"words": prepared.words, "label_names": prepared.label_names} if prepared.words else {}
        if stage_of(self.cfg, server_round) == "encoder":
            return evaluate(
                prepared.model,
                global_state,
                prepared.test,
                batch_size=int(self.cfg["evaluation"]["batch_size"]),
                **words,
            )
        # The encoder is still the frozen one: its test features are computed once.
        return evaluate_head(prepared.model, global_state, prepared.head_test_features(global_state), **words)
