"""The wire protocol (common/protocol.py): what the client writes is what the server reads and allows."""

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from common.protocol import REPLY_RECORDS, SECURE_REPLY_RECORDS, ProtocolError, TrainInstruction, TrainReply

UPDATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def full_reply(**changes):
    fields = dict(
        client_id="7", server_round=3, declined=False, reason="", report={"epsilon": 1.5}, update=UPDATE, fits=True
    )
    return TrainReply(**{**fields, **changes})


def test_a_plain_reply_round_trips_and_uses_exactly_the_allowed_keys():
    content = full_reply().to_content()
    assert set(content.keys()) == set(REPLY_RECORDS)
    for name, keys in REPLY_RECORDS.items():
        if keys is not None:
            assert set(content[name].keys()) == keys  # every allowed key is a field that is written
    back = TrainReply.from_content(content)
    assert (back.client_id, back.server_round, back.declined, back.report, back.fits) == (
        "7",
        3,
        False,
        {"epsilon": 1.5},
        True,
    )
    assert torch.equal(back.decoded_update(10_000)["w"], UPDATE["w"])


def test_the_secure_plain_part_never_holds_the_update_or_the_bit():
    metrics = full_reply().secure_metrics()
    allowed = set().union(*(k for k in SECURE_REPLY_RECORDS.values() if k is not None))
    assert set(metrics) == allowed and "fits" not in metrics


def test_a_declined_reply_carries_no_update_and_its_reason():
    back = TrainReply.from_content(full_reply(declined=True, reason="budget", update=None, fits=None).to_content())
    assert back.declined and back.reason == "budget" and back.arrays is None
    with pytest.raises(ProtocolError, match="no update"):
        back.decoded_update(10_000)


def test_an_extra_key_or_record_is_refused_with_its_name_and_the_client_id():
    content = full_reply().to_content()
    content["metrics"]["loss"] = 0.3
    with pytest.raises(ProtocolError, match="loss") as err:
        TrainReply.from_content(content)
    assert err.value.client_id == "7"
    content = full_reply().to_content()
    content["extra"] = ConfigRecord({"x": 1})
    with pytest.raises(ProtocolError, match="'extra' is not allowed"):
        TrainReply.from_content(content)
    with pytest.raises(ProtocolError, match="fits"):  # in the clear under SecAgg it would reveal one bit
        TrainReply.from_content(
            RecordDict({k: v for k, v in full_reply().to_content().items() if k != "arrays"}), secure=True
        )


def test_an_oversized_payload_is_refused_before_it_is_decoded():
    with pytest.raises(ProtocolError, match="exceeds"):
        TrainReply.from_content(full_reply().to_content()).decoded_update(8)


def test_malformed_reply_names_what_is_missing():
    with pytest.raises(ProtocolError, match="malformed"):
        TrainReply.from_content(RecordDict({"metrics": ConfigRecord({"declined": 0})}))


def test_instruction_round_trips_plain_and_secure():
    inst = TrainInstruction("run", 4, '{"a": 1}', client_clip_norm=0.5)
    back, state = TrainInstruction.from_content(inst.to_content(UPDATE))
    assert back == inst and back.cfg() == {"a": 1} and torch.equal(state["w"], UPDATE["w"])
    assert TrainInstruction.from_config(TrainInstruction("run", 4, "{}").to_config()).client_clip_norm is None
    again, keys, secagg_range = TrainInstruction.from_secure_config(inst.secure_config(["w", "b"], 8.0))
    assert again == inst and keys == ["w", "b"] and secagg_range == 8.0
