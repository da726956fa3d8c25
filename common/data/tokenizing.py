"""Tokenising a client's or the server's examples into fixed-length tensors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import datasets

from common.errors import ConfigError


def tokenize(
    ds: datasets.Dataset, tokenizer, max_length: int, label_names: list[str] | None = None
) -> torch.utils.data.TensorDataset:
    """TensorDataset(input_ids [N,L], attention_mask [N,L], labels [N]), all long.

    Always padded to ``max_length`` (and truncated): a fixed L keeps the shapes of
    Opacus' empty Poisson batches consistent with the real ones. Tagged sentences
    (``tokens``/``tags``, data=conll) give labels [N,L] instead, one tag id (an index into
    ``label_names``) at each word's first subword and -100 elsewhere (:func:`align_words`).
    """
    if "tokens" in ds.column_names:
        return align_words(ds, tokenizer, max_length, label_names).dataset()
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError("train.max_length", f"must be an integer >= 2, got {max_length!r}")
    labels = torch.tensor(ds["label"], dtype=torch.long)
    if len(ds) == 0:
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return torch.utils.data.TensorDataset(empty, empty.clone(), labels)
    enc = tokenizer(list(ds["text"]), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.utils.data.TensorDataset(enc["input_ids"].long(), enc["attention_mask"].long(), labels)


def align_words(ds: datasets.Dataset, tokenizer, max_length: int, label_names: list[str] | None):
    """``common.data.conll.Aligned`` for the tagged sentences of ``ds`` (the server keeps it to map
    subword predictions back to words)."""
    from common.data import conll

    if label_names is None:
        raise ValueError("tagged sentences need the run's tag names to encode their tags")
    sentences = conll.Sentences(Path("<data>"), list(ds["tokens"]), list(ds["tags"]))
    return conll.align(sentences, tokenizer, max_length, {name: i for i, name in enumerate(label_names)})
