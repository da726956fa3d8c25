"""Issue 30's settings, data and report pieces, without a run: the held-out split, the
preferences source, the config's checks and upgrade, the evaluation message's allow-list,
and the report's per-client block."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from common.config.upgrade import upgrade
from common.config.validate import personal_on, validate
from common.data.partition import client_partitions, split_client
from common.data.sources import CLICK, SKIP, client_test_split, load_splits
from common.errors import ConfigError
from common.personal import read_simulated, record_evaluation, summary
from common.protocol import (
    EVALUATED,
    METRICS,
    SERVER_ROUND,
    EvaluateInstruction,
    ProtocolError,
    evaluate_reply,
    read_evaluate_reply,
)
from common.report import build_report
from tests.conftest import compose

BANKING = "../shared/data/banking77"


def test_held_out_split_is_seeded_per_label_and_keeps_one_of_each_label_for_training():
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(50)], "label": [i % 3 for i in range(49)] + [3]})
    train, held = client_test_split(ds, 0.2, seed=7)
    again_train, again_held = client_test_split(ds, 0.2, seed=7)
    assert held["text"] == again_held["text"] and train["text"] == again_train["text"]
    assert set(train["text"]).isdisjoint(held["text"]) and len(train) + len(held) == 50
    assert 3 in train["label"] and 3 not in held["label"]  # a one-example label stays in training
    assert abs(len(held) - 10) <= 2
    assert client_test_split(ds, 0.2, seed=8)[1]["text"] != held["text"]


def test_zero_fraction_holds_nothing_out(tmp_path):
    cfg = compose([], tmp_path)
    part = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    train, held = split_client(cfg, part, 0)
    assert train is part and len(held) == 0
    assert not personal_on(cfg)


def test_preferences_gives_each_user_its_own_clicks_on_the_same_texts(tmp_path):
    cfg = compose(
        [
            "data=preferences",
            f"data.path={BANKING}/train.csv",
            f"data.test_path={BANKING}/test.csv",
            "data.label_column=category",
            "num_clients=4",
            "data.items_per_user=300",
            "data.click_noise=0.0",
        ],
        tmp_path,
    )
    validate(cfg)
    train, test, names = load_splits(cfg["data"], seed=0, num_clients=4)
    assert names == [CLICK, SKIP]
    parts = client_partitions(train, cfg)
    assert [len(p) for p in parts] == [300] * 4 and len(test) == 4 * 60
    liked = []
    for user, part in enumerate(parts):
        assert set(part["user"]) == {user}
        clicked = {t for t, y in zip(part["topic"], part["label"]) if names[y] == CLICK}
        skipped = {t for t, y in zip(part["topic"], part["label"]) if names[y] == SKIP}
        assert len(clicked) == 5 and clicked.isdisjoint(skipped)  # no noise: the liked topics, exactly
        assert sum(names[y] == CLICK for y in part["label"]) == 150  # liked_share 0.5
        liked.append(clicked)
    assert len({frozenset(x) for x in liked}) == 4  # every user its own taste
    # The same text gets different labels from different users.
    label_of = [dict(zip(p["text"], p["label"])) for p in parts]
    topic_of = dict(zip(train["text"], train["topic"]))
    shared = {t for t in label_of[0] if t in label_of[1]}
    differs = [t for t in shared if label_of[0][t] != label_of[1][t]]
    assert all((topic_of[t] in liked[0]) != (topic_of[t] in liked[1]) for t in differs)


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["data.client_test_fraction=1.0"], "data.client_test_fraction"),
        (["data.client_test_fraction=-0.1"], "data.client_test_fraction"),
        (["evaluation.client_every=-1"], "evaluation.client_every"),
        (["personalize=finetune", "personalize.epochs=0"], "personalize.epochs"),
        (["personalize=mixture", "personalize.alpha=1.5"], "personalize.alpha"),
        (["personalize=finetune", "personalize.momentum=1.0"], "personalize.momentum"),
        (["personalize=finetune", "model.pooling=pooler"], "personalize"),
        (["data.client_test_fraction=0.2", "model.pooling=pooler"], "data.client_test_fraction"),
        (["data=preferences", "data.path=x.csv", "partition=dirichlet"], "partition"),
        (["personalize=finetune", "personalize.bogus=1"], "personalize.bogus"),
    ],
)
def test_bad_personal_settings_name_the_setting(tmp_path, overrides, setting):
    cfg = compose([f"+{o}" if ".bogus" in o else o for o in overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == setting


def test_token_classification_refuses_personal_models(tmp_path):
    cfg = compose(["task=token_classification", "data=conll", "data.path=x.conll", "personalize=finetune"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == "personalize"


def test_an_older_runs_config_is_upgraded_to_no_personalisation(tmp_path):
    cfg = compose([], tmp_path)
    old = copy.deepcopy(cfg)
    del old["personalize"], old["evaluation"]["client_every"], old["data"]["client_test_fraction"]
    assert upgrade(old) == cfg
    assert cfg["personalize"] == {"name": "none"} and cfg["data"]["client_test_fraction"] == 0.0


def test_the_evaluation_reply_carries_one_flag_and_nothing_else(task_identity):
    content = evaluate_reply(3, True)
    assert read_evaluate_reply(content) is True
    assert set(content[METRICS].keys()) == {EVALUATED, SERVER_ROUND}
    content[METRICS]["accuracy"] = 0.9
    with pytest.raises(ProtocolError):
        read_evaluate_reply(content)
    instruction = EvaluateInstruction("run", 4, "{}", True)
    back, state = EvaluateInstruction.from_content(instruction.to_content({"w": torch.ones(2)}))
    assert back == instruction and torch.equal(state["w"], torch.ones(2))


def test_summary_gives_mean_tenth_percentile_and_worst_on_the_same_clients():
    rows = [
        {"client_id": str(i), "test_examples": 10, "global_accuracy": g, "personal_accuracy": p}
        for i, (g, p) in enumerate([(0.5, 0.9), (0.7, 1.0), (0.6, None), (0.9, 0.95)])
    ]
    s = summary(rows)
    assert s["clients"] == 3  # the client without a personal figure is left out of both
    assert s["global"]["mean"] == pytest.approx(0.7) and s["global"]["worst"] == 0.5
    assert s["personal"]["worst"] == 0.9 and s["personal"]["p10"] == pytest.approx(0.91)
    assert summary([]) == {"clients": 0, "global": None, "personal": None}


def test_simulated_figures_are_read_per_run_from_the_devices_disks(tmp_path):
    for cid, acc in (("0", 0.5), ("10", 0.75), ("2", 1.0)):
        record_evaluation(tmp_path, cid, {"run_id": "other", "round": 1, "global_accuracy": 0.0})
        record_evaluation(tmp_path, cid, {"run_id": "r", "round": 2, "test_examples": 4, "global_accuracy": acc})
    rows = read_simulated(tmp_path, "r")
    assert [r["client_id"] for r in rows] == ["0", "2", "10"]
    assert rows[0] == {
        "client_id": "0",
        "round": 2,
        "test_examples": 4,
        "global_accuracy": 0.5,
        "personal_accuracy": None,
    }


def _report(config, client_evaluation):
    evaluation = {"round": 2, "num_examples": 5, "accuracy": 0.4, "loss": 1.0, "macro_f1": 0.1, "weighted_f1": 0.1}
    evaluation |= {"labels": ["a", "b"], "per_class": {}, "confusion_matrix": [[1, 0], [0, 1]]}
    rounds = [{"round": r, "accuracy": 0.4, "loss": 1.0} for r in (1, 2)]
    return build_report(
        config=config,
        clients_reported={"clients": {}},
        rounds=rounds,
        evaluation=evaluation,
        client_evaluation=client_evaluation,
    )


def test_the_report_shows_per_client_figures_only_when_the_run_asked(tmp_path):
    plain = compose(["privacy=none"], tmp_path)
    assert "per_client" not in _report(plain, None)["evaluation"]
    asked = compose(["privacy=none", "personalize=finetune"], tmp_path)
    rows = [{"client_id": "0", "test_examples": 3, "global_accuracy": 0.5, "personal_accuracy": 1.0}]
    block = {"round": 2, "source": "read from disks", "per_client": rows}
    report = _report(asked, block)
    assert report["evaluation"]["per_client"] == rows
    assert report["evaluation"]["per_client_summary"]["personal"]["mean"] == 1.0
    assert report["config"]["personalize"]["name"] == "finetune"
    assert any("spend no ε" in c for c in report["caveats"])
    # Deployment (no figures on the server's disk), or figures of another round: none shown, and why.
    for missing in (None, {**block, "round": 1}):
        shown = _report(asked, missing)["evaluation"]
        assert shown["per_client"] == [] and "stay there" in shown["per_client_source"]


def test_a_devices_own_file_holds_out_its_part_and_the_servers_test_file_does_not(tmp_path):
    from common.data.sources import load_local_data, load_local_split

    path = tmp_path / "mine.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
    cfg = compose(["data=csv", f"data.path={path}", "data.labels=[a,b]", "data.client_test_fraction=0.25"], tmp_path)
    train, held, names = load_local_split(cfg, path)
    assert (len(train), len(held), names) == (30, 10, ["a", "b"]) and set(train["text"]).isdisjoint(held["text"])
    assert load_local_data(cfg, path)[0]["text"] == train["text"]
    assert len(load_local_data(cfg, path, "data.test_path", hold_out=False)[0]) == 40
