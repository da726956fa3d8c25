"""data=conll through common.data: the tag vocabulary as label names, sentences
partitioned by their dominant entity ("no entity" a class of its own), alignment."""

from collections import Counter

import pytest

from common.conll import NO_ENTITY, dominant_entity
from common.data import load_splits, partition_train, tokenize
from common.errors import ConfigError
from common.model import load_tokenizer
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
    tags = ["O", "B-corporation", "I-corporation", "B-creative-work", "I-creative-work", "B-group", "I-group",
            "B-location", "I-location", "B-person", "I-person", "B-product", "I-product"]
    with pytest.raises(ConfigError, match="data.labels"):
        load_splits(conll_cfg(labels=[*tags[1:], "O"]), seed=0, num_clients=4)
    with pytest.raises(ConfigError, match="data.labels"):
        load_splits(conll_cfg(labels=tags[:-2]), seed=0, num_clients=4)
