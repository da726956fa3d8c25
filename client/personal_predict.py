"""``fedpriv predict --device STATE_DIR [--client ID] --text T``: the device's personal model answers.

Reads the personal model a device keeps (``<state_dir>/<client_id>/personal.pt``,
``client.personal``): the encoder is rebuilt from the stored model settings and seed (the
pretrained weights, and any adapters from the global model it was trained on), the head is
the personal one. Runs on the device; nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.personal import PERSONAL_MODEL


def find_client(state_dir: Path, client: str | None) -> tuple[Path, str]:
    """(state directory, client id) of the personal model to use: ``--client``, else the one
    client under ``state_dir`` that keeps one (or ``state_dir`` itself is a client's directory)."""
    if client is not None:
        return state_dir, client
    if (state_dir / PERSONAL_MODEL).is_file():
        return state_dir.parent, state_dir.name
    found = sorted(p.name for p in state_dir.iterdir() if (p / PERSONAL_MODEL).is_file()) if state_dir.is_dir() else []
    if len(found) == 1:
        return state_dir, found[0]
    if not found:
        raise FileNotFoundError(
            f"no personal model under {state_dir}: a run with personalize=finetune|mixture leaves one "
            f"in each device's state directory ({PERSONAL_MODEL})"
        )
    raise FileNotFoundError(
        f"{len(found)} clients keep a personal model under {state_dir}: pick one with --client ({', '.join(found)})"
    )


def personal_predictor(state_dir: Path, client: str | None):
    """A function texts -> [(label, probability)] with the device's personal model."""
    import torch

    from client.personal import load_personal
    from common.model.factory import instantiate_model, load_tokenizer
    from common.model.state import load_trainable, model_inputs

    root, client_id = find_client(Path(state_dir), client)
    kept = load_personal(root, client_id)
    cfg = {"model": kept["model"], "seed": kept["seed"], "task": kept["task"]}
    labels = list(kept["label_names"])
    model = instantiate_model(cfg, len(labels))
    load_trainable(model, {**kept["global_state"], **kept["head"]})
    model.eval()
    tokenizer = load_tokenizer(kept["model"])
    max_length = int(kept["max_length"])

    @torch.no_grad()
    def predict(texts: Sequence[str]) -> list[tuple[str, float]]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = model(**model_inputs(enc["input_ids"], enc["attention_mask"])).logits.softmax(-1)
        best = probs.argmax(-1)
        return [(labels[int(i)], float(p[i])) for i, p in zip(best, probs)]

    return predict, client_id, kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpriv predict --device", description="label texts with a device's own personal model"
    )
    parser.add_argument("--device", required=True, type=Path, metavar="STATE_DIR", help="the device's state directory")
    parser.add_argument("--client", help="the client id (default: the one client there with a personal model)")
    parser.add_argument("--text", action="append", required=True, help="a text to label (repeatable)")
    args = parser.parse_args(argv)
    try:
        predict, client_id, kept = personal_predictor(args.device, args.client)
    except FileNotFoundError as err:
        print(f"fedpriv predict: {err}", file=sys.stderr)
        return 2
    print(
        f"# client {client_id}'s personal model ({kept['kind']}, run {str(kept['run_id'])[:8]} round {kept['round']}; "
        "kept on this device, never sent)",
        file=sys.stderr,
    )
    for text, (label, p) in zip(args.text, predict(args.text)):
        print(f"{label}\t{p:.4f}\t{text}")
    return 0
