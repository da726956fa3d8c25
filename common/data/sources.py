"""Reading a data set: the run's source (its train and test splits) or a device's own file.

Every source (the built-in ``synthetic`` set, a local CSV/TSV file, a Hub data set)
ends in the same shape: ``text`` (str) and ``label`` (int in ``[0, K)``) plus any
other columns of the source, with one label mapping shared by train and test. Bad
settings end in a :class:`ConfigError` naming the setting, before any training.

CoNLL files (``data=conll``, token classification) end in ``tokens`` and ``tags``
(lists of str, one per word) and ``label``, the id of the sentence's most frequent
entity type (``common.data.conll.dominant_entity``, "no entity" first): the partitioners
(:mod:`common.data.partition`) split by it, and :func:`load_splits` returns the tag
vocabulary as the label names.

Clients and the server each call these functions themselves with the same config and
seed, so they agree on the splits without ever exchanging data.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: a device whose features are cached reads no data (1 s of imports)
    import datasets

from common.data import synthetic
from common.data.cache import key_of
from common.data.settings import csv_quoting, existing_file, integer, plain, required, unit_fraction
from common.errors import ConfigError

log = logging.getLogger(__name__)

#: The data sources of tagged words (task=token_classification).
TAGGED_SOURCES = ("conll", "hf_tokens")
#: The recommendation source (``data=preferences``): one simulated user per client, labels click/skip.
PREFERENCES = "preferences"
CLICK, SKIP = "click", "skip"


def load_splits(
    data_cfg: Mapping, *, seed: int, num_clients: int
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(train, test, label_names) for the ``data`` config group.

    ``label_names`` are the sorted unique label values of train, as strings; both
    splits are mapped with them, and a test label unseen in train is a ConfigError.
    Deterministic for a given (data_cfg, seed).
    """
    cfg = plain(data_cfg)
    # `data.source` picks the loader (for data=hf `data.name` is the Hub name).
    source = required(cfg, "source")
    loader = _LOADERS.get(source)
    if loader is None:
        raise ConfigError("data.source", f"unknown data source {source!r}; use one of {sorted(_LOADERS)}")
    if source in TAGGED_SOURCES:  # tagged words: the label names are the tags, which the loader encodes itself
        return loader(cfg, seed, num_clients)
    train, test, test_setting = loader(cfg, seed, num_clients)
    return _encode_labels(train, test, test_setting)


def _load_synthetic(cfg: dict, seed: int, num_clients: int):
    num_classes = integer(cfg, "num_classes", minimum=2)
    if num_classes > len(synthetic.INTENTS):
        raise ConfigError(
            "data.num_classes", f"the synthetic set has {len(synthetic.INTENTS)} intents, got {num_classes}"
        )
    num_users = integer(cfg, "num_users", minimum=1)
    train_size = integer(cfg, "train_size", minimum=max(num_users, num_classes))
    test_size = integer(cfg, "test_size", minimum=1)
    label_noise = unit_fraction(cfg, "label_noise", low_inclusive=True)
    ambiguous = unit_fraction(cfg, "ambiguous_fraction", low_inclusive=True)
    train, test = synthetic.generate(
        num_classes=num_classes,
        num_users=num_users,
        train_size=train_size,
        test_size=test_size,
        label_noise=label_noise,
        ambiguous_fraction=ambiguous,
        seed=seed,
    )
    missing = set(synthetic.intent_names(num_classes)) - set(train["label"])
    if missing:
        raise ConfigError("data.train_size", f"too small: classes {sorted(missing)} never occur")
    return train, test, "data.test_size"


def _load_csv(cfg: dict, seed: int, num_clients: int):
    read_args = {
        "sep": required(cfg, "delimiter"),
        "column_names": cfg["column_names"],
        "quoting": csv_quoting(cfg["quoting"]),
        "encoding": required(cfg, "encoding"),
    }
    train = _read_csv(existing_file(cfg, "path"), "data.path", read_args)
    train = _standardise(train, cfg, source="data.path")
    dedupe = bool(cfg["drop_duplicates"])
    seen: set[str] = set()
    if dedupe:
        train = _drop_duplicate_texts(train, seen)
    if cfg["test_path"] is not None:
        test = _read_csv(existing_file(cfg, "test_path"), "data.test_path", read_args)
        test = _standardise(test, cfg, source="data.test_path")
        if dedupe:  # also across splits: a text seen in train must not be tested on
            test = _drop_duplicate_texts(test, seen)
        return train, test, "data.test_path"
    fraction = unit_fraction(cfg, "test_fraction", low_inclusive=False)
    train, test = _stratified_split(train, fraction, seed)
    return train, test, "data.test_fraction"


def _hub_train_test(cfg: dict) -> list[tuple[str, str, datasets.Dataset]]:
    """(setting, split name, Dataset) of ``data.train_split`` and ``data.test_split`` of ``data.name``."""
    name = required(cfg, "name")
    try:
        import datasets

        splits = datasets.load_dataset(name)
    except Exception as err:  # the Hub raises many types (connection, not found, offline)
        raise ConfigError(
            "data.name",
            f"cannot load {name!r} from the Hugging Face Hub, which "
            f"needs internet access (offline, use data=csv or data=conll with a local copy): "
            f"{err.__class__.__name__}: {err}",
        ) from err
    picked = []
    for key in ("train_split", "test_split"):
        split = required(cfg, key)
        if split not in splits:
            raise ConfigError(f"data.{key}", f"{name!r} has no split {split!r}; splits are {list(splits)}")
        picked.append((f"data.{key}", split, splits[split]))
    return picked


def _load_hf(cfg: dict, seed: int, num_clients: int):
    train, test = (_standardise(ds, cfg, source="data.name") for _, _, ds in _hub_train_test(cfg))
    return train, test, "data.test_split"


def _load_conll(cfg: dict, seed: int, num_clients: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(train, test, tag names) of CoNLL files; ``label`` is each sentence's dominant entity."""
    from common.data import conll

    tag_column = cfg["tag_column"]
    train = conll.read_conll(existing_file(cfg, "path"), tag_column=tag_column, setting="data.path")
    test = None
    if cfg["test_path"] is not None:
        test = conll.read_conll(existing_file(cfg, "test_path"), tag_column=tag_column, setting="data.test_path")
    return _tagged_splits(cfg, train, test, seed)


def _load_hf_tokens(cfg: dict, seed: int, num_clients: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(train, test, tag names) of a Hub token-classification set (``data=hf_tokens``): a
    tokens column and a tags column, tags as names or as ids of a ClassLabel feature."""
    from common.data import conll

    name = cfg["name"]
    picked = []
    for key, split, ds in _hub_train_test(cfg):
        for setting in ("tokens_column", "tags_column"):
            if cfg[setting] not in ds.column_names:
                raise ConfigError(
                    f"data.{setting}",
                    f"column {cfg[setting]!r} not in {name!r} ({split}); columns are {ds.column_names}",
                )
        names = getattr(getattr(ds.features[cfg["tags_column"]], "feature", None), "names", None)
        tags = [[names[t] for t in row] if names else row for row in ds[cfg["tags_column"]]]
        picked.append(conll.sentences_from_rows(ds[cfg["tokens_column"]], tags, source=f"{name} {split}", setting=key))
    return _tagged_splits(cfg, picked[0], picked[1], seed)


def _tagged_splits(cfg: dict, train, test, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Tagged sentences as Datasets (``tokens``, ``tags``, ``label`` the dominant entity's id)
    and the tag vocabulary; ``test`` None holds out ``data.test_fraction`` of ``train``."""
    from common.data import conll

    if test is not None:
        found = conll.label_names(train, test)
        train_ds, test_ds = _sentences(train), _sentences(test)
    else:
        found = conll.label_names(train)
        fraction = unit_fraction(cfg, "test_fraction", low_inclusive=False)
        train_ds, test_ds = _stratified_split(_sentences(train), fraction, seed)
    names = [str(v) for v in cfg["labels"]] if cfg.get("labels") else found
    missing = sorted(set(found) - set(names))
    if missing:
        raise ConfigError("data.labels", f"lacks tags {missing[:10]} that the data holds")
    if names[conll.OUTSIDE_ID] != conll.OUTSIDE:
        raise ConfigError("data.labels", f"must begin with {conll.OUTSIDE!r}, the tag outside every entity")
    kinds = [conll.NO_ENTITY, *sorted({name[2:] for name in names if name != "O"})]
    index = {kind: i for i, kind in enumerate(kinds)}
    return _encode(train_ds, index), _encode(test_ds, index), names


def _sentences(sentences) -> datasets.Dataset:
    """A Dataset of one file's sentences: ``tokens``, ``tags``, ``label`` its dominant entity."""
    import datasets

    from common.data.conll import dominant_entity

    return datasets.Dataset.from_dict(
        {"tokens": sentences.tokens, "tags": sentences.tags, "label": [dominant_entity(t) for t in sentences.tags]}
    )


#: source -> loader(cfg, seed, num_clients): (train, test, the setting to blame for test
#: labels), or for conll (train, test, tag names) already encoded.
_LOADERS: dict[str, Callable[[dict, int, int], tuple]] = {
    "synthetic": _load_synthetic,
    "csv": _load_csv,
    "hf": _load_hf,
    "conll": _load_conll,
    "hf_tokens": _load_hf_tokens,
    PREFERENCES: lambda cfg, seed, num_clients: _load_preferences(cfg, seed, num_clients),
}


def _read_csv(path: Path, setting: str, read_args: dict) -> datasets.Dataset:
    """A local CSV/TSV through HF's CSV builder, which hands these options to pandas."""
    try:
        import datasets

        return datasets.load_dataset("csv", data_files=str(path), split="train", **read_args)
    except Exception as err:  # pandas/arrow parse errors come wrapped in several types
        raise ConfigError(
            setting,
            f"cannot read {path} as CSV with delimiter "
            f"{read_args['sep']!r}, quoting {read_args['quoting']} and encoding "
            f"{read_args['encoding']!r}: {err.__class__.__name__}: {err}",
        ) from err


def _standardise(ds: datasets.Dataset, cfg: dict, *, source: str) -> datasets.Dataset:
    """Rename the configured columns to ``text``/``label``; drop rows missing either."""
    text_col, label_col = required(cfg, "text_column"), required(cfg, "label_column")
    for setting, column in (("data.text_column", text_col), ("data.label_column", label_col)):
        if column not in ds.column_names:
            raise ConfigError(
                setting,
                f"column {column!r} not in {cfg.get(source.split('.')[1])!r} ({source}); columns are {ds.column_names}",
            )
    if text_col == label_col:
        raise ConfigError("data.label_column", f"is the same column as data.text_column ({text_col!r})")
    shadowed = [c for c in ("text", "label") if c in ds.column_names and c not in (text_col, label_col)]
    ds = ds.remove_columns(shadowed).rename_columns(
        {old: new for old, new in ((text_col, "text"), (label_col, "label")) if old != new}
    )
    kept = [i for i, (t, y) in enumerate(zip(ds["text"], ds["label"])) if t is not None and y is not None]
    if len(kept) < len(ds):
        log.warning("%s: dropped %d rows with an empty text or label", source, len(ds) - len(kept))
        ds = ds.select(kept)
    if ds.features["text"].dtype != "string":  # pandas reads a number-only text column as numbers
        from datasets import Value

        ds = ds.cast_column("text", Value("string"))
    return ds


def _drop_duplicate_texts(ds: datasets.Dataset, seen: set[str]) -> datasets.Dataset:
    """Keep the first row of each text not already in ``seen`` (which is updated)."""
    keep = []
    for i, text in enumerate(ds["text"]):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return ds.select(keep)


def _stratified_split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out ``fraction`` of every label (rounded), always keeping one for training,
    so that every test label is also a training label."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(ds["label"]):
        by_label[str(y)].append(i)
    test_idx: list[int] = []
    for y in sorted(by_label):
        idx = rng.permutation(by_label[y])
        test_idx.extend(idx[: min(round(len(idx) * fraction), len(idx) - 1)].tolist())
    if not test_idx:
        raise ConfigError("data.test_fraction", f"{fraction} of {len(ds)} rows leaves an empty test split")
    in_test = set(test_idx)
    return ds.select([i for i in range(len(ds)) if i not in in_test]), ds.select(sorted(test_idx))


def client_test_split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training part, held-out part) of one client's data: ``fraction`` of each label held out
    (rounded), drawn with ``seed``, at least one example of each label kept for training.
    Both parts keep the rows' order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(ds["label"]):
        by_label[str(y)].append(i)
    held: set[int] = set()
    for y in sorted(by_label):
        idx = rng.permutation(by_label[y])
        held.update(idx[: min(round(len(idx) * fraction), len(idx) - 1)].tolist())
    return ds.select([i for i in range(len(ds)) if i not in held]), ds.select(sorted(held))


def _load_preferences(cfg: dict, seed: int, num_clients: int):
    """``data=preferences``: items are the texts of a labelled file (``data.path``; its
    ``data.label_column`` read as the item's topic). Each simulated user (one per client)
    draws the ``data.liked_topics`` topics it likes and ``data.items_per_user`` items, a
    ``data.liked_share`` of them from its liked topics; an item's label for that user is
    ``click`` when its topic is liked, flipped with probability ``data.click_noise``. The same
    text thus has different labels for different users. The server's test set is drawn the
    same way for the same users from ``data.test_path`` (or ``data.test_fraction`` of the
    items, held out before any user draws): ``data.test_items_per_user`` items each."""
    items, pool, test_setting = _load_csv(cfg, seed, num_clients)
    liked_topics = integer(cfg, "liked_topics", minimum=1)
    per_user = integer(cfg, "items_per_user", minimum=2)
    test_per_user = integer(cfg, "test_items_per_user", minimum=1)
    share = unit_fraction(cfg, "liked_share", low_inclusive=False)
    noise = unit_fraction(cfg, "click_noise", low_inclusive=True)
    topics = sorted({str(t) for t in items["label"]})
    if liked_topics >= len(topics):
        raise ConfigError("data.liked_topics", f"must be below the {len(topics)} topics of data.path")
    train_rows, test_rows = [], []
    for user in range(num_clients):
        rng = np.random.default_rng([seed, 0x5EED, user])
        liked = set(rng.choice(topics, size=liked_topics, replace=False).tolist())
        train_rows += _user_items(items, liked, per_user, share, noise, rng, user, "data.items_per_user")
        test_rows += _user_items(pool, liked, test_per_user, share, noise, rng, user, "data.test_items_per_user")
    import datasets

    columns = ("text", "label", "user", "topic")
    train = datasets.Dataset.from_dict({c: [r[i] for r in train_rows] for i, c in enumerate(columns)})
    test = datasets.Dataset.from_dict({c: [r[i] for r in test_rows] for i, c in enumerate(columns)})
    return train, test, test_setting


def _user_items(items, liked: set[str], count: int, share: float, noise: float, rng, user: int, setting: str):
    """One user's ``count`` rows (text, click|skip, user, topic) drawn from ``items``."""
    topic_of = [str(t) for t in items["label"]]
    texts = items["text"]
    in_liked = [i for i, t in enumerate(topic_of) if t in liked]
    others = [i for i, t in enumerate(topic_of) if t not in liked]
    n_liked = min(round(count * share), len(in_liked))
    n_other = count - n_liked
    if n_other > len(others) or n_liked == 0:
        raise ConfigError(setting, f"{count} items per user do not fit the file's {len(topic_of)} items")
    picked = [*rng.choice(in_liked, size=n_liked, replace=False).tolist()]
    picked += rng.choice(others, size=n_other, replace=False).tolist()
    flips = rng.random(len(picked)) < noise
    rows = []
    for i, flip in zip(sorted(picked), flips):
        click = (topic_of[i] in liked) != bool(flip)
        rows.append((texts[i], CLICK if click else SKIP, user, topic_of[i]))
    return rows


def _encode_labels(
    train: datasets.Dataset, test: datasets.Dataset, test_setting: str
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    values = set(train["label"])
    try:
        ordered = sorted(values)  # numbers in numeric order
    except TypeError:
        ordered = sorted(values, key=str)
    names = [str(v) for v in ordered]
    if len(names) < 2:
        raise ConfigError("data.label_column", f"needs at least 2 classes in train, found {names}")
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted({str(v) for v in test["label"]} - index.keys())
    if unseen:
        raise ConfigError(
            test_setting,
            f"test labels {unseen[:10]} never occur in train "
            f"(train labels: {names[:10]}{'...' if len(names) > 10 else ''})",
        )

    return _encode(train, index), _encode(test, index), names


def _encode(ds: datasets.Dataset, index: Mapping[str, int]) -> datasets.Dataset:
    """``label`` values replaced by their ids in ``index`` (keys: the values as strings)."""
    ids = [index[str(v)] for v in ds["label"]]
    from datasets import Value

    return ds.remove_columns("label").add_column("label", ids, feature=Value("int64"))


#: How a device reads its own file (node-config data-path) when the run's data group has
#: no such settings (data=synthetic; data=hf has only the columns): conf/data/csv.yaml's
#: values, which tests/common/test_data.py holds these to.
DEVICE_FILE = {
    "delimiter": ",",
    "column_names": None,
    "quoting": None,
    "encoding": "utf-8",
    "text_column": "text",
    "label_column": "label",
}


def load_local_data(
    cfg: Mapping, path: str | Path, setting: str = "node-config data-path", *, hold_out: bool = True
) -> tuple[datasets.Dataset, list[str]]:
    """A device's own training file (node-config ``data-path``) and the run's label names: the
    rows it trains on, less the part it holds out for its own evaluation
    (``data.client_test_fraction``; :func:`load_local_split`). ``hold_out`` False: every row (the
    server's own test file, read the same way)."""
    train, held_out, names = load_local_split(cfg, path, setting, hold_out=hold_out)
    return train, names


def load_local_split(
    cfg: Mapping, path: str | Path, setting: str = "node-config data-path", *, hold_out: bool = True
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """(the training part, the held-out part, the run's label names) of a device's own file.
    The held-out part (``data.client_test_fraction`` of each label, seeded by the run's ``seed``)
    is cut here, before anything is tokenised or computed from the rows.

    The file is read with the run's ``data.*`` column settings (``text_column``,
    ``label_column``, ``delimiter``, ``column_names``, ``quoting``, ``encoding``;
    :data:`DEVICE_FILE` where the run's data group has none, as data=synthetic) and its
    labels are encoded with the run's ``data.labels`` — the server fills those in, so
    every device and the server share one label mapping even when a device holds only
    some of the classes.
    """
    data = plain(cfg["data"])
    labels = data.get("labels")
    if not labels:
        raise ConfigError(
            "data.labels",
            "a device reading its own data-path needs the run's label list; "
            "the server sets it from its data, or set data.labels=[...]",
        )
    source = Path(str(path)).expanduser().resolve()
    if not source.is_file():
        raise ConfigError(setting, f"no such file on this device: {source}")
    given = {key: data[key] if key in data else value for key, value in DEVICE_FILE.items()}
    read_args = {
        "sep": given["delimiter"],
        "column_names": given["column_names"],
        "quoting": csv_quoting(given["quoting"]),
        "encoding": given["encoding"],
    }
    columns = {"text_column": given["text_column"], "label_column": given["label_column"], "path": str(source)}
    ds = _standardise(_read_csv(source, setting, read_args), columns, source="data.path")
    names = [str(v) for v in labels]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in ds["label"]} - index.keys())
    if unknown:
        raise ConfigError(
            setting, f"{source} has labels {unknown[:10]} that are not among the run's data.labels {names[:10]}"
        )
    if len(ds) == 0:
        raise ConfigError(setting, f"{source} holds no usable rows")
    ds = _encode(ds, index)
    fraction = float(data.get("client_test_fraction") or 0.0) if hold_out else 0.0
    if fraction <= 0:
        return ds, ds.select([]), names
    train, held_out = client_test_split(ds, fraction, int(key_of("client-test", cfg["seed"], "own file")[:15], 16))
    return train, held_out, names
