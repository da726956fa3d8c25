"""Server optimizers: how a round's aggregated step becomes the next global model.

``server.round.aggregate.aggregate`` computes the round's step — the equal-weight mean of
the accepted updates, or with client-level DP the noised sum / n_planned — and hands
it to one of these. They see only that released step and their own state, which is
built from earlier released steps alone: post-processing of the DP release, so no
extra ε is spent, whatever the optimizer.

The update rules are Flower's (``flwr.serverapp.strategy``), reproduced on torch
tensors because Flower's strategies take Messages and average weights themselves
(with ``num-examples`` weights; fedpriv's average is its own, see server.round.aggregate).
``tests/server/test_optimizer.py`` checks each rule against Flower's own strategy.
Flower's Δ (aggregated weights − current weights) is fedpriv's step.

- ``fedavg``: w ← w + η Δ (η = ``strategy.server_lr``).
- ``fedavgm`` (Flower's FedAvgM, Hsu et al. 2019): with the pseudo-gradient g = −Δ,
  v ← g in the first round, v ← β v + g after; w ← w − η v. β = 0: no momentum kept
  (Flower then applies w ← w + η Δ, which is fedavg).
- ``fedadam`` (Flower's FedAdam, Reddi et al. 2020): m ← β1 m + (1 − β1) Δ,
  v ← β2 v + (1 − β2) Δ², w ← w + η_t m / (√v + τ) with Flower's bias correction
  η_t = η √(1 − β2^(t+1)) / (1 − β1^(t+1)), t the server round (so t + 1 = 2 in round 1).

Arithmetic is float64; the new weights go back to each parameter's dtype and the state
is kept (and checkpointed) in the parameter's dtype, at least float32, so that a resumed
run continues from exactly the state an uninterrupted one would hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from common.config.schema import STRATEGIES

Tensors = Mapping[str, torch.Tensor]


def apply_step(global_state: Tensors, step: Tensors, *, server_lr: float) -> dict[str, torch.Tensor]:
    """``global + server_lr · step``, back in each parameter's dtype (FedAvg's rule)."""
    return {
        name: (value.to(torch.float64) + server_lr * step[name].to(torch.float64)).to(value.dtype)
        for name, value in global_state.items()
    }


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


class ServerOptimizer:
    """The next global state from the current one and a round's aggregated step."""

    name = "fedavg"
    #: Which parts ``state_dict`` holds once the optimizer has stepped (none: stateless).
    parts: tuple[str, ...] = ()

    def __init__(self, *, server_lr: float) -> None:
        self.server_lr = float(server_lr)
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def stateful(self) -> bool:
        """Whether a checkpoint must carry ``state_dict()`` for a resume to continue exactly."""
        return bool(self.parts)

    def step(self, global_state: Tensors, step: Tensors, *, server_round: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Part name -> parameter name -> tensor; empty before the first step."""
        return {part: {k: v.clone() for k, v in tensors.items()} for part, tensors in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if state and set(state) != set(self.parts):
            raise ValueError(f"{self.name} keeps {list(self.parts)}, not {sorted(state)}")
        for part, tensors in state.items():
            if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError(f"{self.name} state {part!r} is not a dict of tensors")
        self._state = {part: {k: v.clone() for k, v in tensors.items()} for part, tensors in state.items()}

    def _check(self, global_state: Tensors, step: Tensors) -> None:
        if set(step) != set(global_state):
            raise ValueError("step and global state have different keys")
        for part, tensors in self._state.items():
            if set(tensors) != set(global_state):
                raise ValueError(f"{self.name} state {part!r} and the global state have different keys")


class FedAvg(ServerOptimizer):
    """w ← w + η Δ: fedpriv's rule since round one, bit for bit."""

    name = "fedavg"

    def step(self, global_state: Tensors, step: Tensors, *, server_round: int) -> dict[str, torch.Tensor]:
        return apply_step(global_state, step, server_lr=self.server_lr)


class FedAvgM(ServerOptimizer):
    """Flower's FedAvgM: server momentum over the pseudo-gradient −Δ (Flower's sign)."""

    name = "fedavgm"

    def __init__(self, *, server_lr: float, server_momentum: float) -> None:
        super().__init__(server_lr=server_lr)
        self.server_momentum = float(server_momentum)
        self.parts = ("momentum",) if self.server_momentum > 0.0 else ()

    def step(self, global_state: Tensors, step: Tensors, *, server_round: int) -> dict[str, torch.Tensor]:
        self._check(global_state, step)
        if not self.parts:  # Flower keeps no momentum at β = 0: w ← w − η (w − w_avg)
            return apply_step(global_state, step, server_lr=self.server_lr)
        previous = self._state.get("momentum")
        new, momentum = {}, {}
        for name, value in global_state.items():
            old = value.to(torch.float64)
            pseudo_gradient = -step[name].to(torch.float64)  # Flower: old − new
            v = (
                pseudo_gradient
                if previous is None
                else (self.server_momentum * previous[name].to(torch.float64) + pseudo_gradient)
            )
            new[name] = (old - self.server_lr * v).to(value.dtype)
            momentum[name] = v.to(_state_dtype(value))
        self._state = {"momentum": momentum}
        return new


class FedAdam(ServerOptimizer):
    """Flower's FedAdam: first and second moments of Δ, Flower's bias correction."""

    name = "fedadam"
    parts = ("m", "v")

    def __init__(self, *, server_lr: float, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr)
        self.beta_1, self.beta_2, self.tau = float(beta_1), float(beta_2), float(tau)

    def step(self, global_state: Tensors, step: Tensors, *, server_round: int) -> dict[str, torch.Tensor]:
        self._check(global_state, step)
        eta_norm = (
            self.server_lr
            * math.sqrt(1 - math.pow(self.beta_2, server_round + 1.0))
            / (1 - math.pow(self.beta_1, server_round + 1.0))
        )
        m_prev, v_prev = self._state.get("m"), self._state.get("v")
        new, m_state, v_state = {}, {}, {}
        for name, value in global_state.items():
            delta = step[name].to(torch.float64)
            m0 = torch.zeros_like(delta) if m_prev is None else m_prev[name].to(torch.float64)
            v0 = torch.zeros_like(delta) if v_prev is None else v_prev[name].to(torch.float64)
            m = self.beta_1 * m0 + (1 - self.beta_1) * delta
            v = self.beta_2 * v0 + (1 - self.beta_2) * delta**2
            new[name] = (value.to(torch.float64) + eta_norm * m / (torch.sqrt(v) + self.tau)).to(value.dtype)
            m_state[name], v_state[name] = m.to(_state_dtype(value)), v.to(_state_dtype(value))
        self._state = {"m": m_state, "v": v_state}
        return new


def server_optimizer(strategy: Mapping) -> ServerOptimizer:
    """The optimizer that ``strategy.name`` names (config already validated)."""
    name = strategy["name"]
    lr = float(strategy["server_lr"])
    if name == "fedavg":
        return FedAvg(server_lr=lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=lr, server_momentum=float(strategy["server_momentum"]))
    if name == "fedadam":
        return FedAdam(
            server_lr=lr, beta_1=float(strategy["beta_1"]), beta_2=float(strategy["beta_2"]), tau=float(strategy["tau"])
        )
    raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
