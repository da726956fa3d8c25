"""CoNLL-style token-tag files for named-entity recognition, and their subword alignment.

A file holds one token per line, its columns separated by tabs (``token<TAB>tag``; the
tag's column is ``data.tag_column``), and a blank or whitespace-only line ends a
sentence. Tags are IOB2: ``O``, ``B-TYPE``, ``I-TYPE``, where an ``I-TYPE`` continues a
``B-TYPE`` or ``I-TYPE`` of the same type. Bad input stops the run with a
:class:`ConfigError` naming the file and the line number; never the line's text, which
is user data that a config error must not carry into logs.

The model labels subwords, the evaluation scores words: :func:`align` labels the first
subword of each word and masks the rest (-100, the index that cross-entropy ignores);
:func:`predicted_tags` maps the model's subword predictions back to every word of the
sentence, a word the model never saw (cut by ``max_length``, or a character the
tokenizer drops) predicted ``O``, so that the gold sentences are scored whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError

#: The partition class of a sentence without any entity (most WNUT training sentences).
NO_ENTITY = "no entity"

#: The label that torch's cross-entropy ignores: non-first subwords, special tokens, padding.
IGNORE = -100

#: The tag outside every entity, and its id: :func:`label_names` always puts it first.
OUTSIDE, OUTSIDE_ID = "O", 0


@dataclass(frozen=True)
class Sentences:
    """The sentences of one file: ``tokens[i]`` and ``tags[i]`` have equal lengths."""

    path: Path
    tokens: list[list[str]]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tag_set(self) -> frozenset[str]:
        return frozenset(tag for sentence in self.tags for tag in sentence)

    @property
    def entity_types(self) -> list[str]:
        """The entity types the tags name (``creative-work`` for ``B-creative-work``), sorted."""
        return sorted({tag[2:] for tag in self.tag_set if tag != "O"})


# ---------------------------------------------------------------------------
# Reading


def read_conll(path: str | Path, *, tag_column: int = -1, setting: str = "data.path") -> Sentences:
    """The sentences of a CoNLL-style file; ``setting`` names the config key of ``path``.

    ``tag_column`` is a column index as Python counts (0 is the token itself, -1 the last
    column). A file that ends without a blank line still ends its last sentence; runs of
    blank lines make no empty sentences.
    """
    path = Path(path)
    if isinstance(tag_column, bool) or not isinstance(tag_column, int) or tag_column == 0:
        raise ConfigError(
            "data.tag_column",
            f"must be a column index other than 0 (the token); -1 is the last column, got {tag_column!r}",
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(setting, f"cannot read {path}: {err.strerror or err.__class__.__name__}") from err

    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ConfigError(setting, f"{path}: line {number}: not UTF-8 text") from None
        if not text.strip():  # WNUT's train file separates most sentences by a lone tab
            if words:
                tokens.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        columns = text.rstrip("\r").split("\t")
        index = tag_column if tag_column >= 0 else len(columns) + tag_column
        if not 0 < index < len(columns):
            raise ConfigError(
                setting,
                f"{path}: line {number}: no tag column (a token line is "
                f"the token and its tag, separated by tabs; data.tag_column="
                f"{tag_column})",
            )
        tag = columns[index].strip()
        previous = labels[-1] if labels else "O"
        _check_iob2(tag, previous, setting=setting, where=f"{path}: line {number}")
        words.append(columns[0])
        labels.append(tag)
    if words:
        tokens.append(words)
        tags.append(labels)
    if not tokens:
        raise ConfigError(setting, f"{path}: no sentences (the file is empty or only blank lines)")
    return Sentences(path=path, tokens=tokens, tags=tags)


def sentences_from_rows(
    tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]], *, source: str, setting: str
) -> Sentences:
    """Sentences from a data set's rows (tokens and tag names per row), checked as a file
    is: a row whose tag count differs from its token count, or a tag that is not IOB2, is a
    ConfigError naming ``setting``, ``source`` and the row's index (never its text)."""
    out_tokens, out_tags = [], []
    for row, (words, labels) in enumerate(zip(tokens, tags)):
        where = f"{source}: row {row}"
        if len(words) != len(labels):
            raise ConfigError(setting, f"{where}: {len(words)} tokens but {len(labels)} tags")
        previous = "O"
        for tag in labels:
            _check_iob2(str(tag), previous, setting=setting, where=where)
            previous = str(tag)
        if words:
            out_tokens.append([str(w) for w in words])
            out_tags.append([str(t) for t in labels])
    if not out_tokens:
        raise ConfigError(setting, f"{source}: no sentences")
    return Sentences(path=Path(source), tokens=out_tokens, tags=out_tags)


def _check_iob2(tag: str, previous: str, *, setting: str, where: str) -> None:
    # An I- without its B- is an error rather than silently repaired to B-: none of the
    # WNUT 17 files has one, so a file that does is not the IOB2 this reader promises.
    if tag == "O":
        return
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ConfigError(setting, f"{where}: the tag is not IOB2 (O, B-TYPE or I-TYPE)")
    if prefix == "I" and previous[2:] != kind:
        raise ConfigError(
            setting,
            f"{where}: an I- tag must follow a B- or I- tag of the same type (IOB2 begins every entity with B-)",
        )


def label_names(*sentence_sets: Sentences) -> list[str]:
    """The tag vocabulary: ``O``, then ``B-``/``I-`` of each entity type in sorted order.

    Both tags of every type, whether or not each occurs, so the head's shape depends only
    on the entity types; pass train and test so that a type seen only in test has a label.
    """
    types = sorted({kind for sentences in sentence_sets for kind in sentences.entity_types})
    return ["O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I"))]


def dominant_entity(tags: Sequence[str]) -> str:
    """A sentence's most frequent entity type, counted in entities (B- tags); ties go to
    the first name in sorted order; :data:`NO_ENTITY` for a sentence without one."""
    counts = Counter(tag[2:] for tag in tags if tag.startswith("B-"))
    if not counts:
        return NO_ENTITY
    return min(counts, key=lambda kind: (-counts[kind], kind))


# ---------------------------------------------------------------------------
# Subword alignment


@dataclass(frozen=True)
class Aligned:
    """Fixed-shape model inputs for N sentences at length L, and the way back to words.

    ``labels`` carries the tag id at each word's first subword and -100 elsewhere;
    ``word_index`` the word's position in its sentence at those same places, -1 elsewhere.
    ``words_cut[i]`` counts the words of sentence i that ``max_length`` cut off;
    ``words_dropped[i]`` those the tokenizer turns into no subword at all (WNUT's dev and
    test sets hold a lone U+FE0F variation selector). Both are predicted ``O``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    word_index: torch.Tensor
    num_words: list[int]
    words_cut: list[int]
    words_dropped: list[int]

    def dataset(self) -> torch.utils.data.TensorDataset:
        """TensorDataset(input_ids, attention_mask, labels), the training batches' shape."""
        return torch.utils.data.TensorDataset(self.input_ids, self.attention_mask, self.labels)


def align(sentences: Sentences, tokenizer, max_length: int, label_ids: Mapping[str, int]) -> Aligned:
    """Tokenise words into subwords, padded and truncated to ``max_length``.

    Always padded to ``max_length``, as :func:`common.data.tokenizing.tokenize` is: Opacus' empty
    Poisson batches must have the real batches' shape.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "model.tokenizer", "word alignment needs a fast (Rust) tokenizer, whose word_ids() map subwords to words"
        )
    shortest = tokenizer.num_special_tokens_to_add() + 1
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < shortest:
        raise ConfigError(
            "train.max_length",
            f"must be an integer >= {shortest} (the special tokens and one subword), got {max_length!r}",
        )
    unknown = sorted(sentences.tag_set - set(label_ids))
    if unknown:
        raise ValueError(
            f"{sentences.path}: tags {unknown} have no label id; build the ids from label_names() of every split"
        )

    n = len(sentences)
    labels = np.full((n, max_length), IGNORE, dtype=np.int64)
    word_index = np.full((n, max_length), -1, dtype=np.int64)
    if n == 0:
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return Aligned(empty, empty.clone(), torch.from_numpy(labels), torch.from_numpy(word_index), [], [], [])
    enc = tokenizer(
        sentences.tokens,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    # Untruncated, to tell a word cut by max_length from one the tokenizer drops anyway.
    full = tokenizer(sentences.tokens, is_split_into_words=True, add_special_tokens=False)
    cut, dropped = [], []
    for i, tags in enumerate(sentences.tags):
        previous = None
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, position] = label_ids[tags[word]]
                word_index[i, position] = word
            previous = word
        kept = len({w for w in enc.word_ids(i) if w is not None})
        present = len({w for w in full.word_ids(i) if w is not None})
        cut.append(present - kept)
        dropped.append(len(tags) - present)
    return Aligned(
        input_ids=enc["input_ids"].long(),
        attention_mask=enc["attention_mask"].long(),
        labels=torch.from_numpy(labels),
        word_index=torch.from_numpy(word_index),
        num_words=[len(t) for t in sentences.tags],
        words_cut=cut,
        words_dropped=dropped,
    )


def predicted_tags(predictions, aligned: Aligned, label_names: Sequence[str]) -> list[list[str]]:
    """Word-level tags of every sentence from subword predictions (logits [N, L, K] or
    label ids [N, L]): each word takes its first subword's prediction, and a word without
    one is ``O``."""
    ids = torch.as_tensor(predictions)
    if ids.dim() == 3:
        ids = ids.argmax(dim=-1)
    if tuple(ids.shape) != tuple(aligned.word_index.shape):
        raise ValueError(
            f"predictions of shape {tuple(ids.shape)} do not match the aligned inputs {tuple(aligned.word_index.shape)}"
        )
    out = []
    for row_ids, row_words, count in zip(ids.tolist(), aligned.word_index.tolist(), aligned.num_words):
        tags = ["O"] * count
        for label, word in zip(row_ids, row_words):
            if word >= 0:
                tags[word] = label_names[label]
        out.append(tags)
    return out
