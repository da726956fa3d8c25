"""Server optimizers: FedAvg unchanged, FedAvgM and FedAdam exactly Flower's update rules.

The independent reference is Flower's own strategy (``flwr.serverapp.strategy``) driven
through ``configure_train`` / ``aggregate_train`` with one reply whose arrays are
``global + step`` and weight 1, so Flower's Δ is fedpriv's aggregated step. Everything is
float64 there, so both sides compute the same formula in the same precision.
"""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from server.round.aggregate import RoundReplies, aggregate
from server.round.optimizer import FedAdam, FedAvg, FedAvgM, server_optimizer
from tests.conftest import compose

SHAPES = {"lora.A": (4, 3), "head.bias": (5,)}


def tensors(seed, scale=0.05, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for k, s in SHAPES.items()}


GLOBAL = tensors(0, scale=1.0)
STEPS = [tensors(r) for r in (1, 2, 3)]  # three rounds' aggregated (possibly noised) steps


class OneNodeGrid:
    """Just enough Grid for Flower's configure_train to sample one node."""

    def get_node_ids(self):
        return [5]


def flower_rounds(strategy, global_state, steps):
    """Flower's global states (and the strategy) after each round, from its own aggregate_train."""
    arrays = ArrayRecord(torch_state_dict=global_state)
    states = []
    for server_round, step in enumerate(steps, start=1):
        [instruction] = strategy.configure_train(server_round, arrays, ConfigRecord({}), OneNodeGrid())
        current = arrays.to_torch_state_dict()
        sent = {k: current[k] + step[k] for k in current}  # a client's "weights" = global + step
        reply = Message(
            content=RecordDict(
                {"arrays": ArrayRecord(torch_state_dict=sent), "metrics": MetricRecord({"num-examples": 1})}
            ),
            reply_to=instruction,
        )
        arrays, _ = strategy.aggregate_train(server_round, [reply])
        states.append(arrays.to_torch_state_dict())
    return states


def ours(optimizer, global_state, steps):
    states, state = [], global_state
    for server_round, step in enumerate(steps, start=1):
        state = optimizer.step(state, step, server_round=server_round)
        states.append(state)
    return states


def close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k].to(torch.float64), torch.as_tensor(b[k]).to(torch.float64), rtol=1e-12, atol=1e-14
        )


def test_fedavg_is_the_old_apply_step_bit_for_bit():
    # The rule aggregate applied before server optimizers existed, written out here.
    for lr in (1.0, 0.3):
        state = {k: v.to(torch.float32) for k, v in GLOBAL.items()}
        for server_round, step in enumerate(STEPS, start=1):
            old = {k: (v.to(torch.float64) + lr * step[k].to(torch.float64)).to(v.dtype) for k, v in state.items()}
            state = FedAvg(server_lr=lr).step(state, step, server_round=server_round)
            assert all(torch.equal(state[k], old[k]) and state[k].dtype == torch.float32 for k in old)
    assert FedAvg(server_lr=1.0).state_dict() == {}


@pytest.mark.parametrize("lr,momentum", [(1.0, 0.9), (0.5, 0.7), (0.7, 0.0)])
def test_fedavgm_matches_flower_over_three_rounds(task_identity, lr, momentum):
    flower = FlowerFedAvgM(min_train_nodes=1, min_available_nodes=1, server_learning_rate=lr, server_momentum=momentum)
    expected = flower_rounds(flower, GLOBAL, STEPS)
    optimizer = FedAvgM(server_lr=lr, server_momentum=momentum)
    for got, want in zip(ours(optimizer, GLOBAL, STEPS), expected, strict=True):
        close(got, want)
    if momentum > 0:  # same sign convention as Flower's momentum_vector (pseudo-gradient old − new)
        close(optimizer.state_dict()["momentum"], dict(zip(SHAPES, flower.momentum_vector)))
    else:
        assert optimizer.state_dict() == {} and flower.momentum_vector is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # Flower's defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3
        {"eta": 0.3, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2},
    ],
)
def test_fedadam_matches_flower_over_three_rounds(task_identity, kwargs):
    flower = FlowerFedAdam(min_train_nodes=1, min_available_nodes=1, **kwargs)
    expected = flower_rounds(flower, GLOBAL, STEPS)
    optimizer = FedAdam(
        server_lr=kwargs.get("eta", 0.1),
        beta_1=kwargs.get("beta_1", 0.9),
        beta_2=kwargs.get("beta_2", 0.99),
        tau=kwargs.get("tau", 1e-3),
    )
    for got, want in zip(ours(optimizer, GLOBAL, STEPS), expected, strict=True):
        close(got, want)
    close(optimizer.state_dict()["m"], flower.m_t)
    close(optimizer.state_dict()["v"], flower.v_t)


def test_fedadam_first_step_by_hand():
    # Flower's bias correction uses server_round + 1: η √(1 − β2²) / (1 − β1²) in round 1.
    step = {"w": torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64)}
    new = FedAdam(server_lr=0.1).step({"w": torch.zeros(3, dtype=torch.float64)}, step, server_round=1)
    m, v = 0.1 * step["w"], 0.01 * step["w"] ** 2
    eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    torch.testing.assert_close(new["w"], eta * m / (v.sqrt() + 1e-3), rtol=1e-12, atol=0)
    assert new["w"][2] == 0  # a zero coordinate stays put (τ > 0)


def test_parameter_dtype_kept_and_state_at_least_float32():
    state32 = {k: v.to(torch.float32) for k, v in GLOBAL.items()}
    for optimizer in (FedAvgM(server_lr=1.0, server_momentum=0.9), FedAdam(server_lr=0.1)):
        new = optimizer.step(state32, STEPS[0], server_round=1)
        assert all(v.dtype == torch.float32 for v in new.values())
        assert all(t.dtype == torch.float32 for part in optimizer.state_dict().values() for t in part.values())


def test_load_state_dict_refuses_a_foreign_state():
    optimizer = FedAdam(server_lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        optimizer.load_state_dict({"momentum": {"w": torch.zeros(1)}})
    optimizer.load_state_dict({"m": {"w": torch.zeros(1)}, "v": {"w": torch.zeros(1)}})
    with pytest.raises(ValueError, match="keys"):
        optimizer.step({"x": torch.zeros(1)}, {"x": torch.zeros(1, dtype=torch.float64)}, server_round=2)


def test_aggregate_hands_its_step_to_the_optimizer():
    updates = {str(i): tensors(10 + i, dtype=torch.float32) for i in range(3)}
    glob = {k: v.to(torch.float32) for k, v in GLOBAL.items()}
    mean = {k: sum(u[k].to(torch.float64) for u in updates.values()) / 3 for k in SHAPES}
    result = RoundReplies(accepted=updates)
    new = aggregate(glob, result, n_planned=3, optimizer=FedAdam(server_lr=0.1), server_round=1)
    want = FedAdam(server_lr=0.1).step(glob, mean, server_round=1)
    close(new, want)
    # No optimizer: FedAvg at server_lr, exactly as before.
    plain = aggregate(glob, result, server_lr=0.5, n_planned=3)
    assert all(torch.equal(plain[k], FedAvg(server_lr=0.5).step(glob, mean, server_round=1)[k]) for k in SHAPES)


@pytest.mark.parametrize("option,cls", [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedadam", FedAdam)])
def test_every_strategy_option_builds_its_optimizer(tmp_path, option, cls):
    cfg = compose([f"strategy={option}"], tmp_path)
    assert cfg["strategy"]["name"] == option
    optimizer = server_optimizer(cfg["strategy"])
    assert type(optimizer) is cls and optimizer.name == option
    if option == "fedadam":  # Flower's FedAdam defaults
        assert (optimizer.server_lr, optimizer.beta_1, optimizer.beta_2, optimizer.tau) == (0.1, 0.9, 0.99, 1e-3)


def test_default_strategy_is_fedavg(tmp_path):
    assert type(server_optimizer(compose([], tmp_path)["strategy"])) is FedAvg
