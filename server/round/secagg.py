"""One SecAgg+ training round inside fedpriv's round loop (Flower's legacy workflow).

Flower 1.42 offers SecAgg+ only as a legacy workflow (``SecAggPlusWorkflow`` driven by
a ``LegacyContext`` and a legacy ``Strategy``; STACK.md). ``secagg_round`` runs exactly
one fit round of it over the Grid for the nodes fedpriv's loop sampled:

    setup (public keys) → share keys (encrypted Shamir shares) → collect masked
    vectors (clients train, clip, quantise, mask) → unmask (shares of the survivors'
    seeds and of dropped clients' keys) → the sum of the quantised updates.

A tiny legacy strategy (``_OneRound``) hands the workflow our sampled nodes and our
instructions and takes back what it learns; nothing else of Flower's legacy server
is used. Every client reports weight 1 (``num_examples`` never travels), so the
workflow's "weighted average" is the plain mean over the clients that sent a masked
vector, and ``mean × senders`` is the sum. The clients' update checks run on the
client before masking; here only the unmasked sum can be checked
(``server.round.aggregate.check_sum``: finite, norm ≤ senders · C).

The message contract on top of the legacy format (``common.protocol``, ``client/secagg.py``):
the fit config is the plain round's instruction plus the trainable keys in the order of
the parameter arrays and the quantisation range R (``TrainInstruction.secure_config``);
each client's masked vector is its update in that order plus one array ``[fits · R]``
(adaptive clipping's bit, summed securely); its fit metrics are the reply's plain part
(``TrainReply.secure_metrics``), never the update or the bit.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from flwr.serverapp import Grid

from common.privacy.discrete import CLIENT_RANGE, MODULUS
from common.privacy.distributed import DistributedNoise
from common.protocol import ARRAYS, METRICS, PRIVACY, REPLY_RECORDS, TrainInstruction
from common.secagg_graph import shares_and_threshold
from server.round import shamir
from server.round.aggregate import Reply, RoundReplies, SecureSum, collect

log = logging.getLogger(__name__)
#: The records of a masked-vector reply (Flower's mod): the masked vector and the legacy FitRes.
SECURE_RECORDS = {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}


class _Recorder:
    """The Grid as the workflow sees it, keeping what each node answered (or failed) in each stage.

    The workflow hands its strategy only the replies that carried a masked vector and
    anonymous failures; fedpriv's checks need every node: who trained, who failed, who
    never answered (``RoundReplies.missing``/``failed_nodes``, the loop's "reply never
    arrived" caveat).
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        self.masked: list[Message] = []  # replies of the masked-vector stage (the training replies)
        self.errors: dict[int, str] = {}  # node -> its first error reply, any stage

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stages = {
            m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            for m in messages
            if RECORD_KEY_CONFIGS in m.content.config_records
        }
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, Reply.of(reply).error)
            elif Stage.COLLECT_MASKED_VECTORS in stages:
                self.masked.append(reply)
        return replies

    def replies(self) -> list[Reply]:
        """One Reply per answer to the training stage, then one per node that failed before giving one."""
        out = [Reply(m.metadata.src_node_id, plain_part(m.content)) for m in self.masked]
        trained = {m.metadata.src_node_id for m in self.masked}  # their vectors are in the sum
        out += [Reply(node, None, error) for node, error in self.errors.items() if node not in trained]
        return out


def plain_part(content: RecordDict) -> RecordDict:
    """A masked-vector reply as the plain path's records, for ``server.round.aggregate.collect``.

    ``fitres.metrics`` is split into ``privacy`` (its allow-listed keys) and ``metrics``
    (the rest); any record besides the protocol's, plain arrays, or an example count
    other than 1 are carried along as what they are, so that the allow-list refuses them.
    """
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
    except Exception:  # not even a FitRes: malformed (no privacy record)
        return RecordDict()
    metrics = dict(fitres.metrics)
    privacy = {k: metrics.pop(k) for k in list(metrics) if k in REPLY_RECORDS[PRIVACY]}
    if fitres.num_examples != 1:
        metrics["num-examples"] = fitres.num_examples
    plain = RecordDict({METRICS: ConfigRecord(metrics), PRIVACY: ConfigRecord(privacy)})
    if fitres.parameters.tensors:
        plain[ARRAYS] = content["fitres.parameters"]
    for name in set(content.keys()) - SECURE_RECORDS:
        plain[name] = content[name]
    return plain


class _OneRound(Strategy):
    """A legacy strategy for one SecAgg+ round: our nodes in, the workflow's results out."""

    def __init__(self, proxies: Sequence[ClientProxy], fitins: FitIns):
        self.proxies = list(proxies)
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list = []
        self.mean: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        # Called by the unmask stage with every result's parameters set to the unmasked mean.
        self.results, self.failures = list(results), list(failures)
        self.mean = results[0][1].parameters if results else None
        return None, {}  # the loop, not the workflow, owns the global model

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's workflow, its unmask stage rebuilding secrets with ``server.round.shamir`` (the same
    secrets from ``threshold`` shares, without Flower's per-share field inversions). The stage
    reads Flower's module-level ``combine_shares``, which is swapped for the stage's duration
    only: the loop runs one secure round at a time."""

    def unmask_stage(self, grid, context, state) -> bool:
        flower_combine = secaggplus_workflow.combine_shares
        secaggplus_workflow.combine_shares = functools.partial(shamir.combine_shares, threshold=state.threshold)
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            secaggplus_workflow.combine_shares = flower_combine


def workflow_for(
    settings: Mapping, clipping_range: float, timeout: float | None, *, sampled: int
) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with fedpriv's settings (``secaggplus.*``) for ``sampled`` clients; weight 1 each.

    ``num_shares`` and ``reconstruction_threshold`` are resolved for the round
    (``common.secagg_graph.shares_and_threshold``: ``auto`` is SecAgg+'s sparse graph) and
    the share count always reaches Flower as a fraction of the sampled clients, which its
    setup stage turns back into exactly that count (``round(k / n · n)``, odd below n):
    Flower checks an integer count against ``modulus_range / quantization_range``, a bound
    meant for the sum of the weights, not for the number of shares.
    """
    num_shares, threshold = shares_and_threshold(settings, sampled)
    return _Workflow(
        num_shares=num_shares / sampled,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=float(clipping_range),
        quantization_range=int(settings["quantization_range"]),
        modulus_range=int(settings["modulus_range"]),
        timeout=timeout,
    )


def exact_workflow(settings: Mapping, sampled: int, timeout: float | None) -> SecAggPlusWorkflow:
    """SecAgg+ that sums integers exactly modulo 2**31 (distributed noise; ``client.secagg.exact_vector``):
    clipping range ½, quantisation range R = 2**30 and max weight R for a weight of 1, so Flower's
    quantiser maps each client's x in [−R/2, R/2) to x + R/2 with no clipping or rounding, and
    modulus 2**31 (Flower needs it above R). The shares and threshold are :func:`workflow_for`'s
    (``auto`` resolved for ``sampled`` clients, the count handed over as a fraction of them: Flower
    checks an integer against modulus / R = 2), and so is the server's reconstruction."""
    num_shares, threshold = shares_and_threshold(settings, sampled)
    return _Workflow(
        num_shares=num_shares / sampled,
        reconstruction_threshold=threshold,
        max_weight=float(CLIENT_RANGE),
        clipping_range=0.5,
        quantization_range=CLIENT_RANGE,
        modulus_range=MODULUS,
        timeout=timeout,
    )


def quantisation_tolerance(settings: Mapping, clipping_range: float, senders: int, size: int) -> float:
    """Bound on the L2 error of the unmasked sum: < one fixed-point step per coordinate per client."""
    step = 2 * float(clipping_range) / int(settings["quantization_range"])
    return senders * step * math.sqrt(size)


def secagg_round(
    grid: Grid,
    sampled: Sequence[int],
    global_state: Mapping[str, torch.Tensor],
    instruction: TrainInstruction,
    *,
    server_round: int,
    settings: Mapping,
    clipping_range: float,
    timeout: float | None,
    run_id: int | None = None,
    noise: DistributedNoise | None = None,
    stage: str | None = None,
) -> RoundReplies:
    """Run one SecAgg+ fit round for ``sampled``; the result holds the sum, never one update.

    ``noise`` (distributed noise; ``stage`` the recipe's stage of the round): the clients send
    integer releases, summed exactly (:func:`exact_workflow`), and the sum is released only when at
    least ``noise.n_min`` clients' shares are in it."""
    keys = list(global_state)
    params = ndarrays_to_parameters([global_state[k].detach().cpu().numpy() for k in keys])
    fit_config = instruction.secure_config(keys, clipping_range)
    if run_id is None:
        run_id = grid.run.run_id
    strategy = _OneRound([GridClientProxy(int(n), grid, run_id) for n in sampled], FitIns(params, fit_config))
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy
    )
    context.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    context.state.array_records["parameters"] = compat.parameters_to_arrayrecord(params, keep_input=True)
    recorder = _Recorder(grid)
    if noise is not None:
        exact_workflow(settings, len(sampled), timeout)(recorder, context)
        return _exact_replies(
            strategy, recorder, keys, global_state, server_round=server_round, sampled=sampled, noise=noise
        )
    workflow_for(settings, clipping_range, timeout, sampled=len(sampled))(recorder, context)
    return _replies(
        strategy,
        recorder,
        keys,
        global_state,
        server_round=server_round,
        settings=settings,
        clipping_range=clipping_range,
        sampled=sampled,
    )


def exact_sum(mean: np.ndarray, senders: int) -> np.ndarray:
    """The exact integer sum (int64) from Flower's unmasked "mean" of integer releases.

    Flower returns (S − senders·R/2)/senders for S the masked sum modulo M = 2**31 and R = 2**30;
    times ``senders``, rounded, that is congruent to the clients' sum modulo M, which is centred
    back to [−M/2, M/2). The float is exact well within ½ (far below 2**53)."""
    raw = np.rint(np.asarray(mean, dtype=np.float64) * senders).astype(np.int64)
    return np.mod(raw + MODULUS // 2, MODULUS) - MODULUS // 2


def _exact_replies(
    strategy: _OneRound,
    recorder: _Recorder,
    keys: list[str],
    global_state: Mapping[str, torch.Tensor],
    *,
    server_round: int,
    sampled: Sequence[int],
    noise: DistributedNoise,
) -> RoundReplies:
    out = collect(recorder.replies(), server_round=server_round, sampled=sampled, expected=global_state, secure=True)
    if strategy.mean is None:
        missing = len(sampled) - len(recorder.masked)
        out.secure_error = f"secure aggregation halted ({missing} of {len(sampled)} clients missing)"
        log.warning("round %d: secure aggregation halted; the round is not released", server_round)
        return out
    # Only clients that trained added a share (a decline sends zeros): the sum's noise is theirs.
    if len(out.masked) < noise.n_min:
        out.secure_error = (
            f"{len(out.masked)} clients' noise shares in the sum, fewer than "
            f"privacy.sample.distributed.n_min={noise.n_min}: not released"
        )
        log.warning("round %d: %s", server_round, out.secure_error)
        return out
    arrays = parameters_to_ndarrays(strategy.mean)
    if len(arrays) != len(keys) + 1:
        out.secure_error = f"unmasked sum has {len(arrays)} arrays, expected {len(keys) + 1}"
        return out
    senders = len(strategy.results)
    sums = [exact_sum(a, senders) for a in arrays]
    if any(np.abs(a).max(initial=0) > noise.wrap_margin() for a in sums):
        out.secure_error = "a coordinate of the integer sum is near the modulus (it may have wrapped): not released"
        log.warning("round %d: %s", server_round, out.secure_error)
        return out
    total = {
        name: torch.from_numpy(a.reshape(global_state[name].shape)) for name, a in zip(keys, sums[:-1], strict=True)
    }
    out.secure_sum = SecureSum(
        total=total,
        contributors=list(out.masked),
        senders=senders,
        count=int(sums[-1].reshape(-1)[0]),
        integer=True,
    )
    return out


def _replies(
    strategy: _OneRound,
    recorder: _Recorder,
    keys: list[str],
    global_state: Mapping[str, torch.Tensor],
    *,
    server_round: int,
    settings: Mapping,
    clipping_range: float,
    sampled: Sequence[int],
) -> RoundReplies:
    # The same parser as plain rounds: allow-list, round tag, one reply per client id, declines.
    out = collect(recorder.replies(), server_round=server_round, sampled=sampled, expected=global_state, secure=True)
    for who in out.rejected:
        log.warning("round %d: %s: its masked vector is in the sum; the sum check bounds it", server_round, who)
    if strategy.mean is None:
        # The workflow halted (too few clients left for the threshold): nothing is revealed.
        missing = len(sampled) - len(recorder.masked)
        out.secure_error = f"secure aggregation halted ({missing} of {len(sampled)} clients missing)"
        log.warning("round %d: secure aggregation halted; the round is not released", server_round)
        return out
    senders = len(strategy.results)
    arrays = parameters_to_ndarrays(strategy.mean)
    if len(arrays) != len(keys) + 1:
        out.secure_error = f"unmasked sum has {len(arrays)} arrays, expected {len(keys) + 1}"
        return out
    total = {}
    for name, mean in zip(keys, arrays[:-1]):
        ref = global_state[name]
        total[name] = torch.from_numpy(np.asarray(mean, dtype=np.float64) * senders).reshape(ref.shape)
    fits = float(np.asarray(arrays[-1], dtype=np.float64).sum()) * senders / float(clipping_range)
    size = sum(v.numel() for v in global_state.values())
    out.secure_sum = SecureSum(
        total=total,
        contributors=list(out.masked),
        fits=float(round(fits)),
        senders=senders,
        tolerance=quantisation_tolerance(settings, clipping_range, senders, size),
    )
    return out
