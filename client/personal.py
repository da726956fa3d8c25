"""On the device, after a round: the global model on the device's held-out part, and its personal model.

When the server sends an evaluation message (after the run's last round, and every
``evaluation.client_every`` rounds), the device, free of Flower here:

1. checks the run config with the server's own validator (an invalid one is declined);
2. evaluates the global model on its held-out part (``data.client_test_fraction`` of its
   data, cut where its data is loaded, before anything is tokenised: no training batch,
   prototype or stored training feature ever contains it; ``common.data.partition.split_client``);
3. with ``personalize=finetune`` or ``mixture``, trains its personal model from the global
   one on its own training part (the head, on the features of the frozen encoder the
   rounds trained on, or through the global adapters) and evaluates it likewise;
4. keeps the personal model (``personal.pt``) and the figures (``client_eval.jsonl``,
   ``common.personal``) in its state directory.

Nothing of it leaves the device: the reply says only whether it evaluated. The personal
model is trained without DP and never sent, so it spends no ε towards the server or anyone
who receives the global model; the ledger is not read or written here. It is as private
as the device it stays on.

``finetune``: plain SGD on the cross-entropy of the device's training part, starting from
the global head (FedPer-style local head fine-tuning, Arivazhagan et al. 2019, with the
encoder shared). ``mixture``: APFL (Deng, Kamani & Mahdavi 2020, "Adaptive Personalized
Federated Learning"): the global head w stays fixed, a local head v (starting at w) and the
mixing weight α ∈ [0, 1] are trained on the loss of the mixed model α v + (1 − α) w, α by
its own gradient step (``personalize.alpha_lr``), clipped to [0, 1] after each step.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from client.device import select_device
from client.privacy.node_config import ClientIdentity
from client.privacy.policy import REASON_INVALID, setting_name
from client.round import _TOKENIZER_CACHE, _cached_inputs, _client_data, _features_key, _fresh_model, client_features
from common.config.validate import personal_on, validate
from common.data.cache import DATA_CACHE, key_of
from common.data.features import cached_features, data_digests, data_files, frozen_features
from common.data.partition import load_client_split
from common.data.sources import load_local_split
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from common.model.factory import load_tokenizer
from common.model.state import load_trainable, state_digest
from common.personal import PERSONAL_MODEL, device_directory, record_evaluation
from common.recipe import HEAD_PREFIX, head_keys
from common.storage import atomic_write_bytes

log = logging.getLogger(__name__)

#: The held-out part's stored features (frozen encoder) live in a folder of their own, so that
#: the training features' single file (``common.data.features.cached_features``) is never replaced.
HELD_OUT_DIR = "held-out"


@dataclass(frozen=True)
class Evaluated:
    """What the device did with one evaluation message. Only ``ok`` leaves the device."""

    ok: bool
    reason: str = ""  # a fixed text (the device's log)
    line: dict | None = None  # the figures it kept (client_eval.jsonl); never sent


def evaluate_on_device(
    cfg: Any,
    who: ClientIdentity,
    *,
    run_id: str,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
    final: bool,
) -> Evaluated:
    """Steps 1–4 of the module's docstring for one evaluation message."""
    if not isinstance(cfg, Mapping):
        return Evaluated(False, REASON_INVALID.format(setting="config"))
    try:
        validate(cfg)
    except ConfigError as err:
        return Evaluated(False, REASON_INVALID.format(setting=setting_name(err.setting)))
    if not personal_on(cfg):
        return Evaluated(False, "personalize=none and data.client_test_fraction=0: nothing to evaluate")
    started = time.perf_counter()
    inputs = _inputs(cfg, who, global_state)
    line: dict[str, Any] = {
        "run_id": run_id,
        "round": int(server_round),
        "final": bool(final),
        "personalize": cfg["personalize"]["name"],
        "train_examples": len(inputs.train),
        "test_examples": len(inputs.test),
        "global_accuracy": _accuracy(global_head(global_state), inputs.test),
        "personal_accuracy": None,
    }
    if cfg["personalize"]["name"] != "none":
        personal = train_personal(cfg, who, global_state, inputs.train)
        line["personal_accuracy"] = _accuracy(personal.head(), inputs.test)
        line["alpha"] = personal.alpha
        save_personal(cfg, who, personal, global_state, inputs.label_names, run_id=run_id, server_round=server_round)
    line["seconds"] = round(time.perf_counter() - started, 3)
    kept = record_evaluation(who.state_dir, who.client_id, line)
    log.info(
        "client %s: round %d on its %d held-out examples: global %s, personal %s (kept on the device)",
        who.client_id,
        server_round,
        line["test_examples"],
        line["global_accuracy"],
        line["personal_accuracy"],
    )
    return Evaluated(True, "", kept)


# --- the device's features -----------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    train: TensorDataset  # features, labels of the training part
    test: TensorDataset  # of the held-out part (empty without one)
    label_names: list[str]


def frozen_encoder(global_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether only the head travels (the encoder is the frozen pretrained one)."""
    return len(head_keys(global_state)) == len(global_state)


def _inputs(cfg: Mapping, who: ClientIdentity, global_state: Mapping[str, torch.Tensor]) -> _Inputs:
    """The features of the device's training and held-out parts under the global model's encoder.

    With a frozen encoder the training part's are those the rounds stored (computed and stored
    here otherwise, as a round would), and the held-out part's are stored beside them in
    :data:`HELD_OUT_DIR`; through trained adapters both are computed from the global weights."""
    data, label_names = _client_data(cfg, who.partition_id, who.data_path)
    held_out = _held_out_data(cfg, who)
    num_labels = int(global_state[f"{HEAD_PREFIX}weight"].shape[0])
    device = select_device(who.device or cfg["train"]["device"])
    model = None

    def model_with_global():
        nonlocal model
        if model is None:
            model = _fresh_model(cfg, num_labels)
            load_trainable(model, global_state)
        return model

    if frozen_encoder(global_state):
        cached = _cached_inputs(cfg, who, "head", global_state)
        train = cached[0] if cached is not None else client_features(cfg, who, model_with_global(), data, device)
        test = _held_out_features(cfg, who, held_out, model_with_global, device)
    else:
        train = _features(model_with_global(), data, device)
        test = _features(model_with_global(), held_out, device)
    return _Inputs(train, test, list(label_names))


def _held_out_data(cfg: Mapping, who: ClientIdentity) -> TensorDataset:
    """The device's held-out part, tokenised (kept in the process's data cache as a round's data is)."""
    tokenizer_name = cfg["model"]["tokenizer"] or cfg["model"]["name_or_path"]

    def read():
        if who.data_path:
            _, held_out, names = load_local_split(cfg, who.data_path)
        else:
            _, held_out, names = load_client_split(cfg, who.partition_id)
        tokenizer = _TOKENIZER_CACHE.get((tokenizer_name,), lambda: load_tokenizer(cfg["model"]))
        return tokenize(held_out, tokenizer, int(cfg["train"]["max_length"]), names)

    parts = (
        "held-out",
        cfg["data"],
        cfg["partition"],
        cfg["seed"],
        cfg["num_clients"],
        tokenizer_name,
        cfg["train"]["max_length"],
        who.partition_id,
        who.data_path,
    )
    return DATA_CACHE.get(parts, read, data_files(cfg, who.data_path))


def _held_out_features(cfg, who: ClientIdentity, held_out: TensorDataset, model_with_global, device) -> TensorDataset:
    if len(held_out) == 0:
        return _empty()
    digests = DATA_CACHE.read_from(held_out) or data_digests(cfg, who.data_path)
    key = _features_key(cfg, who, digests)
    directory = device_directory(who.state_dir, who.client_id) / HELD_OUT_DIR
    return cached_features(
        directory, key, lambda: _features(model_with_global(), held_out, device), digests=digests, n=len(held_out)
    )


def _features(model: torch.nn.Module, data: TensorDataset, device) -> TensorDataset:
    if len(data) == 0:
        return TensorDataset(torch.zeros(0, int(model.config.hidden_size)), torch.zeros(0, dtype=torch.long))
    model.to(device)
    try:
        return frozen_features(model, data)
    finally:
        model.to("cpu")


def _empty() -> TensorDataset:
    return TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))


# --- the personal model --------------------------------------------------------------


def global_head(global_state: Mapping[str, torch.Tensor]) -> torch.nn.Linear:
    """The global model's head as a Linear layer (the frozen-encoder features are its input)."""
    weight = torch.as_tensor(global_state[f"{HEAD_PREFIX}weight"]).float()
    bias = global_state.get(f"{HEAD_PREFIX}bias")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(torch.as_tensor(bias).float())
    return head


@dataclass
class Personal:
    """A device's personal head: ``weight``/``bias`` the model it predicts with (for ``mixture``
    α v + (1 − α) w, with ``local`` = v and ``alpha`` = α kept beside it)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    alpha: float | None = None
    local: dict[str, torch.Tensor] | None = None

    def head(self) -> torch.nn.Linear:
        return global_head(
            {
                f"{HEAD_PREFIX}weight": self.weight,
                **({f"{HEAD_PREFIX}bias": self.bias} if self.bias is not None else {}),
            }
        )


def train_personal(
    cfg: Mapping, who: ClientIdentity, global_state: Mapping[str, torch.Tensor], train: TensorDataset
) -> Personal:
    """The device's personal head from the global one on its training part's features: plain
    SGD (no DP; it never leaves the device), seeded from the run's seed and the client id."""
    settings = cfg["personalize"]
    generator = torch.Generator().manual_seed(int(key_of("personal", cfg["seed"], who.client_id)[:15], 16))
    w = global_head(global_state)
    for p in w.parameters():
        p.requires_grad_(False)
    v = global_head(global_state)
    params: list[dict] = [{"params": list(v.parameters())}]
    alpha = None
    if settings["name"] == "mixture":
        alpha = torch.tensor(float(settings["alpha"]), requires_grad=True)
        params.append({"params": [alpha], "lr": float(settings["alpha_lr"]), "momentum": 0.0, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(
        params,
        lr=float(settings["lr"]),
        momentum=float(settings["momentum"]),
        weight_decay=float(settings["weight_decay"]),
    )
    features, labels = train.tensors
    n, batch = len(labels), int(settings["batch_size"])
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(int(settings["epochs"]) if n else 0):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x = features[idx].float()
            logits = v(x) if alpha is None else alpha * v(x) + (1 - alpha) * w(x)
            loss = loss_fn(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if alpha is not None:
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
    with torch.no_grad():
        if alpha is None:
            return Personal("finetune", v.weight.detach().clone(), _bias(v))
        a = float(alpha)
        weight = a * v.weight + (1 - a) * w.weight
        bias = a * v.bias + (1 - a) * w.bias if v.bias is not None else None
        local = {"weight": v.weight.detach().clone(), **({"bias": _bias(v)} if v.bias is not None else {})}
        return Personal(
            "mixture", weight.detach().clone(), bias.detach().clone() if bias is not None else None, a, local
        )


def _bias(head: torch.nn.Linear) -> torch.Tensor | None:
    return head.bias.detach().clone() if head.bias is not None else None


@torch.no_grad()
def _accuracy(head: torch.nn.Linear, data: TensorDataset) -> float | None:
    """Accuracy of ``head`` on ``data``'s features; None when there is nothing to score."""
    features, labels = data.tensors
    if len(labels) == 0:
        return None
    return int((head(features.float()).argmax(-1) == labels).sum()) / len(labels)


# --- kept on the device ----------------------------------------------------------------


def personal_path(state_dir: str | Path, client_id: str) -> Path:
    return device_directory(state_dir, client_id) / PERSONAL_MODEL


def save_personal(
    cfg: Mapping,
    who: ClientIdentity,
    personal: Personal,
    global_state: Mapping[str, torch.Tensor],
    label_names: list[str],
    *,
    run_id: str,
    server_round: int,
) -> Path:
    """Keep the personal model in the device's state directory (owner-only, written atomically):
    the head, the global trainable weights it sits on (adapters, if any), and what rebuilds the
    encoder (``fedpriv predict --device``: :mod:`client.personal_predict`)."""
    head = {f"{HEAD_PREFIX}weight": personal.weight}
    if personal.bias is not None:
        head[f"{HEAD_PREFIX}bias"] = personal.bias
    payload = {
        "kind": personal.kind,
        "run_id": run_id,
        "round": int(server_round),
        "global_sha256": state_digest(global_state),
        "head": head,
        "alpha": personal.alpha,
        "local": personal.local,
        "global_state": {k: torch.as_tensor(v).clone() for k, v in global_state.items()},
        "label_names": list(label_names),
        "model": dict(cfg["model"]),
        "seed": int(cfg["seed"]),
        "task": cfg["task"],
        "max_length": int(cfg["train"]["max_length"]),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = personal_path(who.state_dir, who.client_id)
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)
    return path


def load_personal(state_dir: str | Path, client_id: str) -> dict:
    """The personal model a device keeps (:func:`save_personal`'s payload)."""
    path = personal_path(state_dir, client_id)
    if not path.is_file():
        raise FileNotFoundError(f"no personal model at {path}: run a federation with personalize=finetune|mixture")
    return torch.load(path, map_location="cpu", weights_only=True)
