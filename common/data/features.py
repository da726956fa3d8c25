"""Features of a frozen encoder, computed once: the recipe's head stage reads them (pooled
per sentence, or per word for token classification).

A client computes the features of its own data once per (model, data, tokenizer,
max_length) and keeps them in its own state directory, next to its ledger
(``<state_dir>/<client_id>/features-<key>.pt``): never sent, deleted with the state
directory. The file holds n and the digests of the data files they were computed from,
and is read back only while both still hold. The server computes those of its test set once per run, in memory.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from common.data.cache import file_digest, key_of
from common.data.conll import IGNORE
from common.model.state import model_inputs
from common.storage import atomic_write_bytes

log = logging.getLogger(__name__)

FEATURES_PREFIX = "features-"


@torch.no_grad()
def pooled_features(model: torch.nn.Module, data: TensorDataset, *, batch_size: int = 128) -> TensorDataset:
    """(features [N, d] float32, labels [N]) of ``data`` (ids, mask, labels) through ``model.features``.

    Eval mode (no dropout); batches go longest first, each cut to its longest attention-
    masked length (the padding it drops is masked for every example of the batch), and
    the rows come back in ``data``'s order.
    """
    input_ids, attention_mask, labels = data.tensors
    n = len(labels)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = attention_mask.sum(dim=1)
    suffix_padded = bool((attention_mask.cumsum(dim=1).eq(lengths[:, None]) | attention_mask.bool()).all())
    order = torch.argsort(lengths, descending=True, stable=True) if suffix_padded else torch.arange(n)
    width = int(model.config.hidden_size)
    out = torch.zeros(n, width, dtype=torch.float32)
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            cut = max(int(lengths[idx].max()), 1) if suffix_padded else input_ids.shape[1]
            batch = model_inputs(input_ids[idx, :cut].to(device), attention_mask[idx, :cut].to(device))
            out[idx] = model.features(**batch).float().cpu()
    finally:
        model.train(was_training)
    return TensorDataset(out, labels.clone())


@torch.no_grad()
def token_features(model: torch.nn.Module, data: TensorDataset, *, batch_size: int = 64) -> TensorDataset:
    """(features [N, W, d] float32, labels [N, W]) of tagged ``data`` (ids, mask, labels [N, L]):
    the token classifier's features at each labelled subword (each word's first), packed
    to the left in word order; W is the most words any sentence kept, and the slots after
    a sentence's last word are labelled -100 (ignored by the loss and the evaluation).

    The head's logits at a word depend on that word's features alone, so these are the
    inputs a full forward pass would give the head; the unlabelled subwords never reach
    the loss. Sentence i's slot j is its j-th labelled position (see :func:`labelled_positions`).
    """
    input_ids, attention_mask, labels = data.tensors
    n = len(labels)
    positions = labelled_positions(labels)
    width = max(max((len(at) for at in positions), default=0), 1)
    hidden = int(model.config.hidden_size)
    out = torch.zeros(n, width, hidden, dtype=torch.float32)
    packed = torch.full((n, width), IGNORE, dtype=torch.long)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    columns = torch.arange(attention_mask.shape[1])
    last = torch.where(attention_mask.bool(), columns, 0).max(dim=1).values
    try:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            cut = int(last[idx].max()) + 1  # past the batch's last real token, however it is padded
            batch = model_inputs(input_ids[idx, :cut].to(device), attention_mask[idx, :cut].to(device))
            feats = model.features(**batch).float().cpu()
            for row, i in enumerate(idx.tolist()):
                at = positions[i]  # labelled subwords are real tokens: below ``cut``
                out[i, : len(at)] = feats[row, at]
                packed[i, : len(at)] = labels[i, at]
    finally:
        model.train(was_training)
    return TensorDataset(out, packed)


def labelled_positions(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per sentence, the subword positions :func:`token_features` packed, in slot order."""
    return [row.ne(IGNORE).nonzero().squeeze(1) for row in labels]


def frozen_features(model: torch.nn.Module, data: TensorDataset) -> TensorDataset:
    """What the recipe's head stage trains on: pooled sentence features, or packed word
    features for tagged data (labels [N, L])."""
    return token_features(model, data) if data.tensors[-1].dim() == 2 else pooled_features(model, data)


def feature_key(*parts: Any) -> str:
    """A short, stable key for what the features depend on."""
    return key_of(*parts)[:24]


def cached_features(
    directory: str | Path,
    key: str,
    compute: Callable[[], TensorDataset],
    *,
    digests: Sequence[str | None],
    n: int | None = None,
) -> TensorDataset:
    """The features stored under ``directory`` for ``key``, computed (and stored) if absent
    or not those of the data as it is (:func:`stored_features`).

    ``compute`` must give the features of the bytes ``digests`` name (:func:`data_digests`),
    which are stored with them, with their count. Written atomically, so a crash leaves the
    old file or none; a file that does not load is computed again. Other keys' files in
    ``directory`` are removed: one client keeps the features of its current setting only.
    """
    directory = Path(directory)
    path = directory / f"{FEATURES_PREFIX}{key}.pt"
    stored = stored_features(directory, key, digests=digests, n=n)
    if stored is not None:
        return stored
    data = compute()
    buffer = io.BytesIO()
    torch.save(
        {"features": data.tensors[0], "labels": data.tensors[1], "n": len(data.tensors[0]), "digests": list(digests)},
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)
    for other in directory.glob(f"{FEATURES_PREFIX}*.pt"):
        if other != path:
            other.unlink(missing_ok=True)
    return data


def stored_features(
    directory: str | Path, key: str, *, digests: Sequence[str | None], n: int | None = None
) -> TensorDataset | None:
    """The features stored under ``directory`` for ``key``, or None: absent, damaged, or not
    those of the data as it is, that is, their stored digests are not ``digests`` (the data
    files' now), their stored n is not their count (or ``n``, where given), or they have no
    such record (older code wrote them): such features are computed again, never trained on."""
    path = Path(directory) / f"{FEATURES_PREFIX}{key}.pt"
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = stored["features"], stored["labels"]
        count, stored_digests = stored.get("n"), stored.get("digests")
    except Exception:  # a damaged cache is only a cache
        log.warning("cached features %s did not load; computing them again", path.name)
        return None
    if (
        stored_digests != list(digests)
        or count != len(features)
        or len(labels) != len(features)
        or (n is not None and count != n)
    ):
        log.warning(
            "cached features %s are not those of the data files as they are now (their n or data "
            "digests differ, or were not recorded); computing them again",
            path.name,
        )
        return None
    return TensorDataset(features, labels)


def data_files(cfg: Mapping, data_path: str | None) -> dict[str, Any]:
    """The files a client's data is read from, by setting (None where unset; a Hub name is
    no file): its own (node-config data-path), the run's data.path and data.test_path."""
    return {"node-config data-path": data_path, **{f"data.{k}": cfg["data"].get(k) for k in ("path", "test_path")}}


def data_digests(cfg: Mapping, data_path: str | None) -> list[str | None]:
    """The digests of :func:`data_files`' bytes as they are now, in that order."""
    return [file_digest(f) for f in data_files(cfg, data_path).values()]


def features_key_parts(
    cfg: Mapping, partition_id: int, data_path: str | None, digests: Sequence[str | None] | None = None
) -> tuple:
    """What a client's features depend on: the model, its seed, the data and its split, and
    the bytes of the data files read (``digests``, of the data the features are computed
    from; by default the files' now), so features of an edited file are computed again."""
    if digests is None:
        digests = data_digests(cfg, data_path)
    return (
        cfg["model"],
        cfg["seed"],
        cfg["data"],
        cfg["partition"],
        cfg["num_clients"],
        partition_id,
        data_path,
        cfg["train"]["max_length"],
        list(digests),
    )
