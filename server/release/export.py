"""``fedpriv export RUN_DIR OUT``: a run's released model as a directory the ecosystem loads.

Built from :func:`server.release.released.load_released` alone (the resolved config, one round's
checkpoint verified against the manifest's SHA-256, the model that config builds), so
what is exported is exactly what the run evaluated. Three layouts, one per kind of head:

* ``transformers`` — HF's own ``*ForSequenceClassification`` (``model.pooling=pooler``):
  ``save_pretrained`` with ``id2label``/``label2id``; loads with
  ``transformers.pipeline("text-classification", model=OUT)``. A LoRA model is merged
  into it with ``--merge``;
* ``peft`` — the same model without ``--merge``: the adapter alone (``adapter_config.json``
  naming the base it was trained on, the adapter and head weights); loads with peft's
  ``AutoPeftModelForSequenceClassification``. Refused for a randomly initialised base,
  which no one can load by name;
* ``setfit`` — a head over mean- or [CLS]-pooled (optionally L2-normalised) features
  (:class:`common.model.pooling.PooledClassifier`): a SentenceTransformer body (Transformer,
  Pooling, Normalize modules: the pooling travels with the model) and a scikit-learn
  LogisticRegression head whose decision function is our linear head, so SetFit's
  ``predict`` is the argmax of our logits and ``predict_proba`` their softmax. SetFit's
  body has no place for an adapter: a LoRA encoder is merged, always, and the export
  says so.

Beside the model: ``README.md`` (the model card, :mod:`server.release.model_card`), a copy of the
run's ``privacy_report.json`` and ``fedpriv_export.json`` (where the weights came from:
run, round, checkpoint file and SHA-256, layout). The tokenizer keeps the run's
``train.max_length`` as ``model_max_length``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.model.pooling import PooledClassifier
from common.rundir import RunDir
from server.release.released import Released, load_released
from server.round.checkpoint import Manifest

EXPORT_META = "fedpriv_export.json"

#: The layouts (see the module docstring) and the library that loads each.
LIBRARIES = {"transformers": "transformers", "peft": "peft", "setfit": "setfit"}


class ExportError(ValueError):
    """The run cannot be exported as asked; the message names the argument or setting."""


@dataclass
class Exported:
    out: Path
    layout: str
    merged: bool  # a LoRA adapter was merged into the encoder
    meta: dict


def export(run_dir: str | Path, out: str | Path, *, server_round: int | None = None, merge: bool = False) -> Exported:
    """Write the model of ``run_dir`` after ``server_round`` (default: the last) into ``out``."""
    from server.release.model_card import write_card

    run_dir, out = Path(run_dir), Path(out)
    report_path = RunDir(run_dir).report_json
    if not report_path.is_file():
        raise FileNotFoundError(
            f"{report_path} is missing: the model card states the run's ε from it "
            f"(run `fedpriv report {run_dir}` to re-render it)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"OUT {out} exists and is not empty: export into a new directory")
    released = load_released(run_dir, server_round)
    report = json.loads(report_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    layout, merged = write_model(released, out, merge=merge)
    manifest = Manifest.load(run_dir)
    checkpoint = manifest.rounds[released.server_round]
    meta = {
        "fedpriv_version": report.get("fedpriv_version"),
        "layout": layout,
        "library": LIBRARIES[layout],
        "merged": merged,
        "run_dir": str(run_dir.resolve()),
        "run_id": manifest.run_id,
        "round": released.server_round,
        "checkpoint_file": f"checkpoints/{checkpoint['file']}",
        "checkpoint_sha256": released.checkpoint_sha256,
        "labels": list(released.label_names),
        "max_length": int(released.cfg["train"]["max_length"]),
        "base_model": base_model_name(released.cfg["model"]),
    }
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(report_path, out / report_path.name)  # the report travels with the model
    write_card(out, meta, report, released.cfg)
    return Exported(out, layout, merged, meta)


def base_model_name(model_cfg: dict) -> str | None:
    """The Hub id of the pretrained weights the run started from; None for a random init.

    ``minilm`` is the pip-shipped copy of sentence-transformers/all-MiniLM-L6-v2; a local
    directory has no Hub id.
    """
    from common.model.factory import MINILM

    name = str(model_cfg["name_or_path"])
    if not model_cfg.get("pretrained", True):
        return None
    if name == MINILM:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return None if Path(name).exists() else name


def write_model(released: Released, out: Path, *, merge: bool) -> tuple[str, bool]:
    """Save ``released.model`` into ``out`` in the layout its head needs: (layout, merged)."""
    from peft import PeftModel

    model = released.model
    tokenizer = released.tokenizer
    tokenizer.model_max_length = int(released.cfg["train"]["max_length"])
    if isinstance(model, PooledClassifier):
        merged = isinstance(model.backbone, PeftModel)
        _save_setfit(model, released, out)
        return "setfit", merged
    ids = dict(enumerate(released.label_names))
    if isinstance(model, PeftModel):
        if not merge:
            if not released.cfg["model"].get("pretrained", True):
                raise ExportError(
                    "--merge: the adapter's base is a random initialisation (model.pretrained=false) "
                    "that no one can load by name; pass --merge to export the whole model"
                )
            _label(model.get_base_model().config, ids)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            return "peft", False
        model = model.merge_and_unload()
        merged = True
    else:
        merged = False
    _label(model.config, ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return "transformers", merged


def _label(config, id2label: dict[int, str]) -> None:
    config.id2label = dict(id2label)
    config.label2id = {label: i for i, label in id2label.items()}


def _save_setfit(model: PooledClassifier, released: Released, out: Path) -> None:
    import numpy as np
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    if model.pooling not in ("mean", "cls"):
        raise ExportError(
            f"model.pooling={model.pooling} with model.normalize=true: sentence-transformers' Pooling "
            "has no BERT-pooler mode, so this head cannot be exported with its pooling"
        )
    encoder = model.backbone
    if isinstance(encoder, PeftModel):
        # merge_and_unload changes the module in place; the released model is not used after export.
        encoder = encoder.merge_and_unload()
    max_length = int(released.cfg["train"]["max_length"])
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save_pretrained(tmp)
        released.tokenizer.save_pretrained(tmp)
        transformer = modules.Transformer(tmp, max_seq_length=max_length)
        stages = [transformer, modules.Pooling(int(encoder.config.hidden_size), pooling_mode=model.pooling)]
        if model.normalize:
            stages.append(modules.Normalize())
        body = SentenceTransformer(modules=stages, device="cpu")
    weight = model.classifier.weight.detach().cpu().double().numpy()
    bias = model.classifier.bias.detach().cpu().double().numpy()
    head = LogisticRegression()
    if len(bias) == 2:
        # sklearn's binary head is one logit through a sigmoid: sigmoid(z1 - z0) is the
        # softmax of (z0, z1), and its sign the argmax.
        weight, bias = (weight[1] - weight[0])[None, :], bias[1:] - bias[:1]
    head.coef_, head.intercept_ = weight, bias
    head.classes_ = np.arange(model.num_labels)
    setfit = SetFitModel(model_body=body, model_head=head, labels=list(released.label_names))
    setfit.save_pretrained(str(out))
