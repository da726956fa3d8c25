"""Bytes each client sends per round: LoRA adapters + head vs the whole model.

Both directions carry the same ArrayRecord shape (global weights down, update up),
so bytes per client per round = 2 x the record. The full-model figure is what a
federation that sends every parameter (22.7 M, embeddings included) would ship.
Measured with Flower's own ``ArrayRecord.count_bytes`` (the payload of the message)
and by serialising the record to its protobuf as the gRPC transport does.
"""

from __future__ import annotations

import time

import _common

GOAL_RATIO = 200.0


def record_bytes(state: dict) -> dict:
    from flwr.app import ArrayRecord

    record = ArrayRecord(torch_state_dict=state)
    try:
        from flwr.common.serde import array_record_to_proto

        wire = len(array_record_to_proto(record).SerializeToString())
    except Exception:  # serde layout differs between Flower versions
        wire = None
    return {
        "parameters": int(sum(t.numel() for t in state.values())),
        "arrays": len(state),
        "count_bytes": int(record.count_bytes()),
        "protobuf_bytes": wire,
    }


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    started = time.monotonic()
    from common.model.state import trainable_state

    num_labels = 77  # Banking77's intents: the head is 384 x 77 + 77
    model = _common.build("minilm_lora", num_labels)
    lora = record_bytes(trainable_state(model))
    # Everything but the adapters (and peft's copies of the head): what full fine-tuning sends.
    full_state = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}
    full = record_bytes(full_state)
    head = record_bytes(trainable_state(_common.build("minilm_head", num_labels)))  # the default model
    ratio = full["count_bytes"] / lora["count_bytes"]
    _common.write_json(
        args.out,
        {
            "benchmark": "comm",
            "quick": args.quick,  # the measurement is exact; quick and full are the same
            "machine": _common.machine(),
            "num_labels": num_labels,
            "lora": lora,
            "head": head,
            "full_model": full,
            "bytes_per_client_per_round": {
                "lora": 2 * lora["count_bytes"],
                "full_model": 2 * full["count_bytes"],
                "note": "download (global weights) + upload (update), equal sizes",
            },
            "ratio_full_over_lora": round(ratio, 1),
            "goal": f"ratio >= {GOAL_RATIO:.0f}",
            "goal_met": ratio >= GOAL_RATIO,
        },
        started,
    )


if __name__ == "__main__":
    main()
