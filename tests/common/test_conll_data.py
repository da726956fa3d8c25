"""data=conll through common.data.sources, .partition and .tokenizing: the tag vocabulary as label names, sentences
partitioned by their dominant entity ("no entity" a class of its own), alignment."""

from collections import Counter

import pytest

from common.data.conll import NO_ENTITY, dominant_entity
from common.data.partition import partition_train
from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from common.model.factory import load_tokenizer
from tests.conftest import SHARED_DATA, config_group

WNUT = SHARED_DATA / "wnut17"


def conll_cfg(**overrides):
    cfg = config_group("data", "conll", "data.path=x", "task=token_classification")
    cfg.update(path=str(WNUT / "wnut17train.conll"), test_path=str(WNUT / "emerging.test.annotated"))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def wnut():
    return load_splits(conll_cfg(), seed=0, num_clients=4)


def test_label_names_are_the_tags_and_label_is_the_dominant_entity(wnut):
    train, test, names = wnut
    assert (len(train), len(test)) == (3394, 1287)
    assert names[0] == "O" and len(names) == 13
    kinds = [NO_ENTITY, *sorted({n[2:] for n in names if n != "O"})]
    for row in train.select(range(200)):
        assert kinds[row["label"]] == dominant_entity(row["tags"])
    share = Counter(train["label"])[0] / len(train)
    assert share == pytest.approx(0.638, abs=0.001)  # no entity: the data README's 64 %


def test_dirichlet_over_dominant_entities_skews_them(wnut):
    train, _, _ = wnut
    part = {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 10, "self_balancing": False}
    parts = partition_train(train, part, num_clients=4, seed=0)
    assert sum(len(p) for p in parts) == len(train)
    shares = [Counter(p["label"])[0] / len(p) for p in parts]
    assert max(shares) - min(shares) > 0.2  # clients differ in how many sentences hold no entity


def test_without_a_test_file_a_stratified_share_is_held_out():
    train, test, _ = load_splits(conll_cfg(test_path=None, test_fraction=0.2), seed=0, num_clients=4)
    assert len(train) + len(test) == 3394
    assert Counter(test["label"])[0] / len(test) == pytest.approx(0.638, abs=0.01)


def test_tokenize_labels_first_subwords(wnut):
    train, _, names = wnut
    data = tokenize(train.select(range(50)), load_tokenizer({"tokenizer": None, "name_or_path": "minilm"}), 128, names)
    ids, mask, labels = data.tensors
    assert labels.shape == ids.shape == (50, 128)
    assert int(labels.ne(-100).sum()) == sum(len(t) for t in train.select(range(50))["tokens"])


def test_labels_must_start_with_o_and_cover_the_data():
    tags = [
        "O",
        "B-corporation",
        "I-corporation",
        "B-creative-work",
        "I-creative-work",
        "B-group",
        "I-group",
        "B-location",
        "I-location",
        "B-person",
        "I-person",
        "B-product",
        "I-product",
    ]
    with pytest.raises(ConfigError, match="data.labels"):
        load_splits(conll_cfg(labels=[*tags[1:], "O"]), seed=0, num_clients=4)
    with pytest.raises(ConfigError, match="data.labels"):
        load_splits(conll_cfg(labels=tags[:-2]), seed=0, num_clients=4)


def _hub_like(tmp_path, rows_by_split, tag_names):
    """A local data set directory as datasets.load_dataset reads it: one parquet file per
    split, tags stored as ClassLabel ids (the Hub's usual token-classification layout)."""
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=tag_names)),
        }
    )
    for split, rows in rows_by_split.items():
        ids = [[tag_names.index(t) for t in tags] for _, tags in rows]
        datasets.Dataset.from_dict({"tokens": [w for w, _ in rows], "ner_tags": ids}, features=features).to_parquet(
            str(tmp_path / f"{split}.parquet")
        )
    return tmp_path


def test_a_hub_token_set_reads_class_label_tags(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rows = {
        "train": [(["Ada", "Lovelace", "wrote"], ["B-PER", "I-PER", "O"]), (["in", "London"], ["O", "B-LOC"])],
        "test": [(["Paris", "is", "big"], ["B-LOC", "O", "O"])],
    }
    cfg = config_group("data", "hf_tokens", "data.name=x", "task=token_classification")
    cfg["name"] = str(_hub_like(tmp_path, rows, names))
    train, test, labels = load_splits(cfg, seed=0, num_clients=1)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert train["tags"] == [["B-PER", "I-PER", "O"], ["O", "B-LOC"]] and test["tokens"] == [["Paris", "is", "big"]]
    assert train["label"] == [2, 1]  # no entity, LOC, PER: dominant entity ids


def test_a_hub_row_that_is_not_iob2_names_the_row_not_its_text(tmp_path):
    names = ["O", "B-PER", "I-PER", "I-LOC"]
    rows = {"train": [(["fine"], ["O"]), (["Secret", "Name"], ["O", "I-LOC"])], "test": [(["x"], ["O"])]}
    cfg = config_group("data", "hf_tokens", "data.name=x", "task=token_classification")
    cfg["name"] = str(_hub_like(tmp_path, rows, names))
    with pytest.raises(ConfigError, match=r"data.train_split: .*train: row 1") as err:
        load_splits(cfg, seed=0, num_clients=1)
    assert "Secret" not in str(err.value)
    cfg["tokens_column"] = "words"
    with pytest.raises(ConfigError, match="data.tokens_column"):
        load_splits(cfg, seed=0, num_clients=1)
