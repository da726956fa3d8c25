"""fedpriv explain: the model's own attention, a summary that finds what decides, a readable page."""

from __future__ import annotations

import random
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from common.model.factory import build_model, load_tokenizer
from common.model.state import model_inputs
from common.rundir import RunDir
from server.release.explain import explain_texts
from server.release.explain_page import render_page, write_run_explanations
from tests.conftest import compose, model_group

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
VARIANTS = {
    "pooled": {},  # common.model.pooling.PooledClassifier, encoder at .backbone
    "hf": {"pooling": "pooler", "normalize": None},  # HF's BertForSequenceClassification
    "hf_lora": {"pooling": "pooler", "normalize": None, "lora": LORA},  # peft's wrapper around it
    "pooled_lora": {"lora": LORA},  # peft inside the PooledClassifier's encoder
}
LONG = "please refund the double charge on my card from last tuesday, it was a mistake " * 3


def tiny(variant: str, num_labels: int = 3):
    # The encoder trainable (tiny_bert's own default freezes it): adapters need it, and the
    # planted-keyword model must learn the word in its encoder, as recipe=finetune would.
    group = {**model_group("tiny_bert"), "freeze_encoder": False, **VARIANTS[variant]}
    return build_model(num_labels=num_labels, seed=3, **group), load_tokenizer(group)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_rows_sum_to_one_and_prediction_is_the_models(variant):
    model, tokenizer = tiny(variant)
    model.eval()
    texts = ["my parcel never arrived", LONG]
    max_length = 16
    short, long_ = explain_texts(model, tokenizer, ["a", "b", "c"], max_length, texts)
    for x in (short, long_):
        layers, heads, rows, cols = x.attentions.shape
        assert (layers, heads) == (2, 2) and rows == cols == len(x.tokens) == len(x.scores) == len(x.special)
        np.testing.assert_allclose(x.attentions.sum(axis=-1), 1.0, atol=1e-5)  # every layer, head and row
        assert (x.attentions >= 0).all()
        assert tokenizer.pad_token not in x.tokens
    assert len(long_.tokens) == max_length  # truncated at train.max_length, never padded
    assert short.special[0] and short.special[-1] and not any(short.special[1:-1])
    # What the default (SDPA) forward says, unchanged by the eager pass, which is switched back off.
    enc = tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**model_inputs(enc["input_ids"], enc["attention_mask"])).logits[0].double(), -1)
    assert list(short.probabilities.values()) == pytest.approx(probs.tolist(), abs=1e-6)
    assert short.label == ["a", "b", "c"][int(probs.argmax())]
    assert short.probability == pytest.approx(float(probs.max()))
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_label_names_must_match_the_model():
    model, tokenizer = tiny("pooled")
    with pytest.raises(ValueError, match="3 classes but 2 label names"):
        explain_texts(model, tokenizer, ["a", "b"], 16, ["hello"])


# --- the planted keyword ----------------------------------------------------------

KEYWORD = "zebra"
WORDS = (
    "the a my your order card account please help need want today payment flight hotel booking phone "
    "screen password login refund delivery parcel late broken new old quick blue green small large "
    "morning evening"
).split()


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Filler sentences; every second one has the keyword at a random place, and only that decides its label."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), KEYWORD)
        out.append((" ".join(words), i % 2))
    return out


@pytest.fixture(scope="module")
def keyed_model():
    """tiny_bert as a run builds it, trained (plainly, no DP) until it classifies by the keyword."""
    model, tokenizer = tiny("pooled", num_labels=2)
    train = sentences(512, seed=1)
    enc = tokenizer([t for t, _ in train], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    labels = torch.tensor([y for _, y in train])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    # One thread: 1.4 s; torch's default one per core measured 70 s on the shared 2-core machine.
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # dropout
        for _ in range(200):
            idx = torch.randint(0, len(labels), (32,), generator=batches)
            loss = model(**model_inputs(enc["input_ids"][idx], enc["attention_mask"][idx]), labels=labels[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    return model.eval(), tokenizer


def test_summary_highlights_the_planted_keyword(keyed_model):
    model, tokenizer = keyed_model
    test = sentences(40, seed=2)
    found = explain_texts(model, tokenizer, ["plain", "keyed"], 16, [t for t, _ in test])
    accuracy = np.mean([x.label == ("keyed" if y else "plain") for x, (_, y) in zip(found, test)])
    assert accuracy >= 0.95  # the model does key on the word, so the summary has something to find
    keyed = [x for x, (_, y) in zip(found, test) if y]
    tops = [x.tokens[int(np.argmax(x.scores))] for x in keyed]  # over all tokens, special ones included
    assert np.mean([top == KEYWORD for top in tops]) >= 0.9, tops
    assert all(x.top_tokens(1) == [KEYWORD] for x, top in zip(keyed, tops) if top == KEYWORD)


# --- the page ------------------------------------------------------------------------


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data


def test_page_names_the_prediction_and_escapes_every_text(keyed_model):
    model, tokenizer = keyed_model
    hostile = "<script>alert(1)</script> my zebra & parcel"
    found = explain_texts(model, tokenizer, ["plain", "<b>keyed</b>"], 16, [hostile, "my parcel is late"])
    page = render_page(found, title="t", context="no client data was used", true_labels=["<b>keyed</b>", "plain"])
    parsed = Tags()
    parsed.feed(page)
    names = [t for t, _ in parsed.tags]
    assert page.startswith("<!DOCTYPE html>") and "html" in names and "script" not in names and "b" not in names
    assert f"Predicted class: {found[0].label}" in parsed.text and f"Predicted class: {found[1].label}" in parsed.text
    assert hostile in parsed.text and "true class: <b>keyed</b>" in parsed.text  # shown as text, not as markup
    images = [a for t, a in parsed.tags if t == "img"]
    assert len(images) == 2 and all(a["src"].startswith("data:image/png;base64,") for a in images)
    assert not [a for _, a in parsed.tags if any(str(v).startswith(("http", "//")) for v in a.values())]


# --- a real run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-client, 1-round tiny_bert run through the real round loop and ClientApp (in process),
    ended as every runtime ends it (server.runtime.serve.federate: the page from memory)."""
    from server.round.loop import prepare
    from server.runtime.grid import InProcessGrid
    from server.runtime.serve import federate
    from tests.conftest import server_of_run

    where = tmp_path_factory.mktemp("explain") / "run"
    cfg = compose(["model=tiny_bert", "data.train_size=400", "data.test_size=80", "num_clients=2", "rounds=1"], where)

    def read_back(*args, **kwargs):
        raise AssertionError("the run's end reads the run directory back")

    with server_of_run(), pytest.MonkeyPatch.context() as patch:
        patch.setattr("server.release.explain_page.load_released", read_back)  # the page comes from memory
        federate(InProcessGrid(2), prepare(cfg), where)
    return where


def test_cli_writes_the_page_of_the_released_model(run_dir, monkeypatch, capsys):
    from server.cli import main
    from server.release.released import load_released

    labels = load_released(run_dir).label_names
    monkeypatch.setattr(
        sys,
        "argv",
        ["fedpriv", "explain", str(run_dir), "--text", "I was charged twice", "--text", "my flight got cancelled"],
    )
    assert main() == 0
    lines = capsys.readouterr().out.splitlines()
    page = (run_dir / "explain.html").read_text()
    assert len(lines) == 3 and str(run_dir / "explain.html") in lines[-1] and "round 1" in lines[-1]
    for line, text in zip(lines, ["I was charged twice", "my flight got cancelled"]):
        label = line.split(" (", 1)[0]
        assert label in labels and line.endswith(text)
        assert f"Predicted class: <strong>{label}</strong>" in page
    assert "no client data was used" in page and "given on the command line" in page

    out = run_dir / "elsewhere" / "round0.html"
    monkeypatch.setattr(
        sys, "argv", ["fedpriv", "explain", str(run_dir), "--text", "hi", "--round", "0", "--out", str(out)]
    )
    assert main() == 0 and out.exists() and "after round 0" in out.read_text()
    monkeypatch.setattr(sys, "argv", ["fedpriv", "explain", str(run_dir), "--text", "hi", "--round", "5"])
    assert main() == 2
    assert "no checkpoint of round 5" in capsys.readouterr().err


def test_run_page_explains_test_inputs_of_distinct_classes(run_dir):
    from server.release.released import load_released

    released = load_released(run_dir)
    written_by_the_run = RunDir(
        run_dir
    ).explain_page.read_text()  # the run's end, from memory (evaluation.explain_inputs)
    path = write_run_explanations(run_dir, count=3)  # from the run directory, as `fedpriv explain` reads it
    assert path == RunDir(run_dir).explain_page and path.read_text() == written_by_the_run
    page = Tags()
    page.feed(path.read_text())
    test = released.test_split()
    assert len(test) == len(released.test_set()) == 80  # data.test_size, as text and as the run evaluated it
    firsts = {}
    for i, label in enumerate(test["label"]):
        firsts.setdefault(label, i)
    for i in sorted(firsts.values())[:3]:
        assert test[i]["text"] in page.text and f"true class: {released.label_names[test[i]['label']]}" in page.text
    assert page.text.count("Predicted class:") == 3 and "from the server's test split" in page.text
