"""CoNLL files, IOB2 checks and word-to-subword alignment (common/data/conll.py)."""

import functools
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.data.conll import (
    IGNORE,
    NO_ENTITY,
    Sentences,
    align,
    dominant_entity,
    label_names,
    predicted_tags,
    read_conll,
)
from common.errors import ConfigError
from common.report.ner_metrics import entity_report
from tests.conftest import SHARED_DATA, model_group

WNUT = SHARED_DATA / "wnut17"
TRAIN, DEV, TEST = WNUT / "wnut17train.conll", WNUT / "emerging.dev.conll", WNUT / "emerging.test.annotated"
WNUT_TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]
SECRET = "Zanzibarquux"  # a word of the bad line that no error message may repeat


@functools.lru_cache(maxsize=None)
def wnut(path: Path) -> Sentences:
    return read_conll(path)


@functools.lru_cache(maxsize=None)
def tokenizer():
    from common.model.factory import load_tokenizer

    return load_tokenizer(model_group("tiny_bert"))  # the MiniLM WordPiece tokenizer


def write(tmp_path, text: str, name="data.conll") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("path, sentences", [(TRAIN, 3394), (DEV, 1009), (TEST, 1287)])
def test_wnut_files_have_the_published_sentence_counts_and_six_types(path, sentences):
    data = wnut(path)
    assert len(data) == sentences
    assert data.entity_types == WNUT_TYPES
    assert all(len(tokens) == len(tags) > 0 for tokens, tags in zip(data.tokens, data.tags))


def test_wnut_train_separates_most_sentences_by_a_lone_tab():
    lines = TRAIN.read_text(encoding="utf-8").split("\n")
    assert lines.count("\t") == 2394  # what makes the separator case real, not hypothetical
    assert wnut(TRAIN).tokens[0][:3] == ["@paulwalk", "It", "'s"]


def test_whitespace_lines_end_sentences_and_runs_of_them_make_no_empty_ones(tmp_path):
    path = write(
        tmp_path, "Hi\tO\n\t\nI\tO\nlove\tO\nParis\tB-location\n \t \n\n\r\nNew\tB-location\r\nYork\tI-location"
    )  # no trailing newline, CRLF
    data = read_conll(path)
    assert data.tokens == [["Hi"], ["I", "love", "Paris"], ["New", "York"]]
    assert data.tags == [["O"], ["O", "O", "B-location"], ["B-location", "I-location"]]
    assert data.tag_set == {"O", "B-location", "I-location"}


def test_tag_column_picks_a_column_of_a_multi_column_file(tmp_path):
    path = write(tmp_path, "EU\tNNP\tB-ORG\tx\nrejects\tVBZ\tO\tx\n")
    assert read_conll(path, tag_column=2).tags == [["B-ORG", "O"]]
    assert read_conll(path, tag_column=-2).tags == [["B-ORG", "O"]]
    with pytest.raises(ConfigError, match="line 1: the tag is not IOB2"):
        read_conll(path)  # the last column, "x"
    with pytest.raises(ConfigError) as err:
        read_conll(path, tag_column=0)
    assert err.value.setting == "data.tag_column"


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (SECRET, "no tag column"),
        (f"{SECRET}\t", "the tag is not IOB2"),
        (f"{SECRET}\tPERSON", "the tag is not IOB2"),
        (f"x\tb-{SECRET}", "the tag is not IOB2"),
        (f"{SECRET}\tB-", "the tag is not IOB2"),
        (f"x\tE-{SECRET}", "the tag is not IOB2"),
        (f"x\tI-{SECRET}", "an I- tag must follow a B- or I- tag of the same type"),  # after O
        (f"x\tI-person{SECRET}", "an I- tag must follow a B- or I- tag of the same type"),  # after B-person
    ],
)
def test_bad_lines_name_file_and_line_number_never_the_text(tmp_path, bad_line, reason):
    path = write(tmp_path, f"first\tO\n\nJohn\tB-person\n{bad_line}\nend\tO\n", name="bad.conll")
    with pytest.raises(ConfigError) as err:
        read_conll(path, setting="data.test_path")
    message = str(err.value)
    assert err.value.setting == "data.test_path"
    assert f"{path}: line 4: {reason}" in message
    assert SECRET not in message


def test_an_i_tag_continues_its_own_entity_type(tmp_path):
    ok = write(tmp_path, "New\tB-location\nYork\tI-location\nCity\tI-location\n", name="ok.conll")
    assert read_conll(ok).tags == [["B-location", "I-location", "I-location"]]
    # A sentence break ends the entity: an I- at the start of the next one has nothing to continue.
    broken = write(tmp_path, "New\tB-location\n\t\nYork\tI-location\n", name="broken.conll")
    with pytest.raises(ConfigError, match="line 3: an I- tag must follow"):
        read_conll(broken)


def test_the_wnut_files_have_no_i_tag_without_its_b():
    # Why an orphan I- is an error and not repaired: the real data never needs the repair.
    for path in (TRAIN, DEV, TEST):
        for tags in wnut(path).tags:
            for previous, tag in zip(["O", *tags], tags):
                assert not tag.startswith("I-") or previous[2:] == tag[2:]


@pytest.mark.parametrize("text", ["", "\n\t\n \n\r\n"])
def test_a_file_without_sentences_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"{path}: no sentences"):
        read_conll(path)


def test_unreadable_files_are_errors_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError) as err:
        read_conll(tmp_path / "missing.conll", setting="data.test_path")
    assert err.value.setting == "data.test_path" and "missing.conll" in str(err.value)
    latin1 = tmp_path / "latin1.conll"
    latin1.write_bytes("a\tO\n\ncaf\xe9\tO\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="line 3: not UTF-8 text"):
        read_conll(latin1)


# ---------------------------------------------------------------------------
# Labels and partition classes


def test_label_names_put_o_first_then_b_and_i_of_each_sorted_type(tmp_path):
    train = read_conll(write(tmp_path, "a\tB-zoo\nb\tB-ant\nc\tI-ant\n", name="train"))
    test = read_conll(write(tmp_path, "a\tB-bee\n", name="test"))
    assert label_names(train) == ["O", "B-ant", "I-ant", "B-zoo", "I-zoo"]
    assert (
        label_names(test, train)
        == label_names(train, test)
        == ["O", "B-ant", "I-ant", "B-bee", "I-bee", "B-zoo", "I-zoo"]
    )
    assert len(label_names(wnut(TRAIN))) == 1 + 2 * len(WNUT_TYPES)


def test_dominant_entity_counts_entities_not_tokens_and_breaks_ties_by_name():
    assert dominant_entity(["O", "O"]) == NO_ENTITY
    # one three-word person against two one-word locations: location has more entities
    assert dominant_entity(["B-person", "I-person", "I-person", "B-location", "O", "B-location"]) == "location"
    assert dominant_entity(["B-product", "B-group"]) == "group"
    assert dominant_entity(["B-product", "B-group", "B-product"]) == "product"


def test_most_wnut_training_sentences_have_no_entity():
    classes = Counter(dominant_entity(tags) for tags in wnut(TRAIN).tags)
    assert classes[NO_ENTITY] == 2166  # 63.8 % of 3,394 (the 64 %)
    assert set(classes) == {NO_ENTITY, *WNUT_TYPES}
    assert classes.most_common(3) == [(NO_ENTITY, 2166), ("person", 368), ("location", 335)]


# ---------------------------------------------------------------------------
# Alignment

NAMES = ["O", "B-location", "I-location", "B-person", "I-person"]
IDS = {name: i for i, name in enumerate(NAMES)}
WORDS = ["Kaepernick", "kneels", "in", "New", "York"]
TAGS = ["B-person", "O", "O", "B-location", "I-location"]


def one(words=WORDS, tags=TAGS) -> Sentences:
    return Sentences(path=Path("mem.conll"), tokens=[list(words)], tags=[list(tags)])


def test_the_first_subword_of_each_word_carries_its_tag_and_the_rest_are_masked():
    tok = tokenizer()
    pieces = [len(tok.tokenize(word)) for word in WORDS]
    assert pieces[0] >= 3  # a word split into several subwords
    aligned = align(one(), tok, 24, IDS)
    expected = [IGNORE]  # [CLS]
    for count, tag in zip(pieces, TAGS):
        expected += [IDS[tag]] + [IGNORE] * (count - 1)
    used = len(expected) + 1  # [SEP]
    expected += [IGNORE] * (24 - len(expected))
    assert aligned.labels.tolist() == [expected]
    assert aligned.input_ids.shape == aligned.attention_mask.shape == aligned.word_index.shape == (1, 24)
    assert aligned.attention_mask[0].tolist() == [1] * used + [0] * (24 - used)
    assert aligned.input_ids.dtype == aligned.labels.dtype == torch.long
    firsts = aligned.word_index[0][aligned.word_index[0] >= 0].tolist()
    assert firsts == list(range(len(WORDS)))
    assert (aligned.word_index >= 0).tolist() == (aligned.labels != IGNORE).tolist()
    assert aligned.words_cut == [0] and aligned.words_dropped == [0] and aligned.num_words == [5]
    assert [t.shape for t in aligned.dataset().tensors] == [(1, 24)] * 3


def test_words_cut_by_max_length_are_counted_and_predicted_o():
    tok = tokenizer()
    kept = 2 + len(tok.tokenize("Kaepernick")) + 1  # [CLS], Kaepernick, the first subword of kneels, [SEP]
    aligned = align(one(), tok, kept, IDS)
    assert aligned.words_cut == [3]  # in, New, York
    assert aligned.input_ids.shape == (1, kept)
    # the model predicts every subword it sees right; the cut words still count against it
    tags = predicted_tags(aligned.labels.clamp(min=0), aligned, NAMES)
    assert tags == [["B-person", "O", "O", "O", "O"]]
    report = entity_report(one().tags, tags)
    assert report["per_entity"]["person"]["f1"] == 1.0
    assert report["per_entity"]["location"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["micro_f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_a_word_the_tokenizer_drops_is_not_counted_as_cut():
    sentence = one(["I", "\ufe0f", "Paris"], ["O", "O", "B-location"])  # WNUT dev has lone U+FE0F
    aligned = align(sentence, tokenizer(), 16, IDS)
    assert aligned.words_dropped == [1] and aligned.words_cut == [0]
    assert predicted_tags(aligned.labels.clamp(min=0), aligned, NAMES) == sentence.tags


def test_predicted_tags_take_logits_or_ids_and_check_their_shape():
    aligned = align(one(), tokenizer(), 24, IDS)
    ids = torch.zeros((1, 24), dtype=torch.long)
    ids[aligned.word_index >= 0] = torch.tensor([IDS["B-person"], IDS["I-person"], 0, 0, IDS["B-location"]])
    logits = torch.nn.functional.one_hot(ids, len(NAMES)).float()
    expected = [["B-person", "I-person", "O", "O", "B-location"]]
    assert predicted_tags(ids, aligned, NAMES) == predicted_tags(logits, aligned, NAMES) == expected
    assert predicted_tags(ids.numpy(), aligned, NAMES) == expected
    with pytest.raises(ValueError, match="do not match"):
        predicted_tags(ids[:, :10], aligned, NAMES)


def test_alignment_refuses_unknown_tags_and_too_short_lengths():
    with pytest.raises(ValueError, match=r"\['B-person'\] have no label id"):
        align(one(), tokenizer(), 24, {"O": 0, "B-location": 1, "I-location": 2})
    with pytest.raises(ConfigError) as err:
        align(one(), tokenizer(), 2, IDS)  # room for [CLS] and [SEP] only
    assert err.value.setting == "train.max_length"
    empty = align(Sentences(Path("none"), [], []), tokenizer(), 8, IDS)
    assert empty.input_ids.shape == empty.labels.shape == (0, 8) and empty.words_cut == []


@pytest.mark.parametrize("path, max_length", [(TRAIN, 128), (TEST, 64)])
def test_every_real_word_is_labelled_once_cut_or_dropped(path, max_length):
    data = wnut(path)
    names = label_names(wnut(TRAIN), wnut(TEST))
    aligned = align(data, tokenizer(), max_length, {n: i for i, n in enumerate(names)})
    labelled = (aligned.labels != IGNORE).sum(dim=1).tolist()
    assert [a + c + d for a, c, d in zip(labelled, aligned.words_cut, aligned.words_dropped)] == aligned.num_words
    gold_back = predicted_tags(aligned.labels.clamp(min=0), aligned, names)
    if max_length == 128:  # the longest training sentence has 75 subwords: nothing is cut
        assert sum(aligned.words_cut) == 0 and gold_back == data.tags
    else:  # test sentences run to 191 subwords: the cut words are O, the rest as given
        assert sum(aligned.words_cut) > 0
        assert all(g == "O" or g == t for got, tags in zip(gold_back, data.tags) for g, t in zip(got, tags))
