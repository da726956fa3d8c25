"""``fedpriv export`` / ``fedpriv predict``: what leaves fedpriv loads without it and is the run's model.

Two real runs (the in-process Grid, 2 clients, 2 rounds, tiny_bert): the default pooled head
(mean + L2 norm, recipe probe) exports in the SetFit layout, HF's own classifier
(``FAST``: pooler, recipe finetune) as a transformers directory. Each export is loaded in
a subprocess that refuses to import any fedpriv package, from a neutral working
directory, with the library's standard loader; its accuracy on the run's test split
must equal what the run recorded in ``metrics.jsonl`` for that round, exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, compose, model_group

SMALL = ["data.train_size=400", "data.test_size=80", "num_clients=2", "rounds=2"]
RUNS = {"pooled": ["model=tiny_bert", *SMALL], "hf": [*FAST, *SMALL]}

#: Run in the subprocess: a fedpriv import is an error, so the load proves no fedpriv code is used.
LOADER = r"""
import importlib.abc, json, sys
class NoFedpriv(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("server", "client", "common", "fedpriv_conf"):
            raise ImportError("fedpriv code imported: " + name)
sys.meta_path.insert(0, NoFedpriv())
out, layout, texts = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
if layout == "setfit":
    from setfit import SetFitModel
    model = SetFitModel.from_pretrained(out)
    labels = list(model.predict(texts))
    probs = model.predict_proba(texts, as_numpy=True).tolist()
    max_length = model.model_body.max_seq_length
else:
    from transformers import pipeline
    classify = pipeline("text-classification", model=out, device="cpu")
    rows = classify(texts, truncation=True, top_k=None)
    labels = [max(r, key=lambda x: x["score"])["label"] for r in rows]
    probs = None
    max_length = classify.tokenizer.model_max_length
print(json.dumps({"labels": labels, "probs": probs, "max_length": max_length}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run_dir} of the two real runs."""
    from server.round.loop import prepare, run_federation
    from server.runtime.grid import InProcessGrid
    from tests.conftest import server_of_run

    made = {}
    with server_of_run():
        for name, overrides in RUNS.items():
            base = tmp_path_factory.mktemp(name)
            cfg = compose([*overrides, f"state_dir={base / 'clients'}"], base / "run")
            run_federation(InProcessGrid(2), prepare(cfg), base / "run")  # writes .hydra/config.yaml too
            made[name] = base / "run"
    return made


def load_outside(out: Path, layout: str, texts: list[str], tmp_path: Path) -> dict:
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    neutral = tmp_path / "elsewhere"
    neutral.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(out), layout, str(texts_file)],
        cwd=neutral,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out(run_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """The run's test texts, their label names, and the run's label names in id order."""
    from common.data.sources import load_splits
    from server.release.released import run_config

    cfg = run_config(run_dir)
    _, test, labels = load_splits(cfg["data"], seed=int(cfg["seed"]), num_clients=int(cfg["num_clients"]))
    return list(test["text"]), [labels[int(y)] for y in test["label"]], list(labels)


def recorded_accuracy(run_dir: Path, server_round: int) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(m["accuracy"] for m in lines if m["round"] == server_round)


def checkpoint(run_dir: Path, server_round: int) -> tuple[dict, str]:
    """The round's checkpoint tensors and the SHA-256 of its file, which must be the manifest's."""
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    entry = manifest["rounds"][str(server_round)]
    blob = (run_dir / "checkpoints" / entry["file"]).read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    assert sha == entry["sha256"]
    return torch.load(run_dir / "checkpoints" / entry["file"], weights_only=True), sha


def highest_epsilon(run_dir: Path) -> float:
    report = json.loads((run_dir / "privacy_report.json").read_text())
    return max(c["epsilon"] for c in report["sample_level"]["clients"])


def check_card(out: Path, run_dir: Path, server_round: int, sha: str, library: str) -> None:
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"library_name: {library}" in front and "pipeline_tag: text-classification" in front
    assert "- differential-privacy" in front and "- federated-learning" in front
    assert f"checkpoint_sha256: {sha}" in front and f"round: {server_round}" in front
    stated = re.search(r"Highest client ε: (\d+\.(\d+))", card)
    assert stated and len(stated.group(2)) >= 2
    assert float(stated.group(1)) == pytest.approx(highest_epsilon(run_dir), abs=10 ** -len(stated.group(2)) / 2)
    report = json.loads((run_dir / "privacy_report.json").read_text())
    for caveat in report["caveats"]:
        assert caveat in card
    assert "RDPAccountant" in card and "one training example of one client" in card
    assert json.loads((out / "privacy_report.json").read_text()) == report
    meta = json.loads((out / "fedpriv_export.json").read_text())
    assert meta["checkpoint_sha256"] == sha and meta["round"] == server_round


@pytest.mark.e2e  # starts a process
@pytest.mark.parametrize("server_round", [1, None], ids=["round1", "final"])
def test_pooled_head_exports_as_setfit(runs, tmp_path, server_round):
    import joblib
    from safetensors.torch import load_file

    from server.release.export import export

    run_dir = runs["pooled"]
    out = tmp_path / "out"
    done = export(run_dir, out, server_round=server_round)
    chosen = done.meta["round"]
    assert done.layout == "setfit" and chosen == (server_round or 2)

    texts, truth, names = held_out(run_dir)
    got = load_outside(out, "setfit", texts, tmp_path)
    accuracy = sum(p == t for p, t in zip(got["labels"], truth)) / len(truth)
    # Same weights, same pooling, float32 encoder: the run's argmax decisions, so exact.
    assert accuracy == recorded_accuracy(run_dir, chosen)
    assert all(abs(sum(p) - 1) < 1e-9 for p in got["probs"])

    state, sha = checkpoint(run_dir, chosen)
    head = joblib.load(out / "model_head.pkl")
    body = load_file(out / "model.safetensors")
    for name, tensor in state.items():
        if name.startswith("classifier."):
            exported = head.coef_ if name.endswith("weight") else head.intercept_
            assert torch.equal(torch.from_numpy(exported).float(), tensor), name
        else:
            assert torch.equal(body[name.removeprefix("backbone.")], tensor), name
    assert list(head.classes_) == list(range(len(head.classes_)))
    assert json.loads((out / "config_setfit.json").read_text())["labels"] == names
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 40
    assert got["max_length"] == 40  # the loaded body truncates where the run did
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    check_card(out, run_dir, chosen, sha, "setfit")


@pytest.mark.e2e  # starts a process
def test_hf_head_exports_for_the_pipeline(runs, tmp_path):
    from safetensors.torch import load_file

    from server.release.export import export

    run_dir = runs["hf"]
    out = tmp_path / "out"
    done = export(run_dir, out)
    assert done.layout == "transformers" and not done.merged

    texts, truth, names = held_out(run_dir)
    got = load_outside(out, "transformers", texts, tmp_path)
    accuracy = sum(p == t for p, t in zip(got["labels"], truth)) / len(truth)
    assert accuracy == recorded_accuracy(run_dir, 2)
    assert got["max_length"] == 40

    state, sha = checkpoint(run_dir, 2)
    weights = load_file(out / "model.safetensors")
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == dict(enumerate(names))
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 40
    check_card(out, run_dir, 2, sha, "transformers")


def test_tampered_checkpoint_is_refused(runs, tmp_path):
    from server.release.export import export
    from server.round.checkpoint import CheckpointError

    run_dir = tmp_path / "run"
    shutil.copytree(runs["hf"], run_dir)
    target = run_dir / "checkpoints" / "round_0002.pt"
    blob = bytearray(target.read_bytes())
    blob[-20] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        export(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_predict(runs, tmp_path, capsys, monkeypatch):
    from server import cli

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["fedpriv", "export", str(runs["hf"]), str(out)])
    assert cli.main() == 0
    assert "transformers" in capsys.readouterr().out

    texts, _, _ = held_out(runs["hf"])
    for where in (out, runs["hf"]):  # the export and the run directory say the same
        monkeypatch.setattr(sys, "argv", ["fedpriv", "predict", str(where), "--text", texts[0], "--text", texts[1]])
        assert cli.main() == 0
        rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
        assert [r[2] for r in rows] == texts[:2]
        if where == out:
            first = rows
    assert [r[0] for r in rows] == [r[0] for r in first]
    assert [float(r[1]) for r in rows] == pytest.approx([float(r[1]) for r in first], abs=2e-4)

    data = tmp_path / "in.csv"
    data.write_text('message,id\n"secret row, text",1\n')
    monkeypatch.setattr(sys, "argv", ["fedpriv", "predict", str(out), "--file", str(data)])
    assert cli.main() == 2
    err = capsys.readouterr().err
    assert "--text-column 'text'" in err and "secret row" not in err
    monkeypatch.setattr(sys, "argv", ["fedpriv", "predict", str(out), "--file", str(data), "--text-column", "message"])
    assert cli.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "message,label,probability" and lines[1].startswith('"secret row, text",')

    monkeypatch.setattr(sys, "argv", ["fedpriv", "export", str(runs["hf"]), str(out)])
    assert cli.main() == 2 and "OUT" in capsys.readouterr().err  # never over an earlier export


def released_of(model_cfg: dict, labels: list[str], *, seed: int = 0, perturb: bool = True):
    """A Released around a freshly built model whose LoRA B weights are non-zero (so the adapter matters)."""
    from common.model.factory import build_model, load_tokenizer
    from server.release.released import Released

    model = build_model(num_labels=len(labels), seed=seed, **model_cfg)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "classifier" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    cfg = {"model": {**model_cfg, "pretrained": model_cfg["pretrained"]}, "train": {"max_length": 16}}
    return Released(
        Path("."), cfg, 1, model, load_tokenizer(model_cfg), labels, "0" * 64, test=None
    )  # no run behind it: exports only, never its test split


TEXTS = ["please refund my invoice", "my parcel never arrived at the door", "hi"]
LABELS = ["billing", "delivery", "travel"]
TINY_LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}


def logits_of(released) -> torch.Tensor:
    enc = released.tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return released.model(**enc).logits


def test_lora_hf_head_merged_and_as_adapter(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    from server.release.export import ExportError, write_model

    tiny = {
        **model_group("tiny_bert"),
        "pooling": "pooler",
        "normalize": None,
        "freeze_encoder": False,
        "lora": TINY_LORA,
    }
    released = released_of(tiny, LABELS)
    want = logits_of(released)
    with pytest.raises(ExportError, match="--merge"):  # a random base cannot be named in adapter_config.json
        write_model(released, tmp_path / "adapter", merge=False)
    assert write_model(released, tmp_path / "merged", merge=True) == ("transformers", True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    enc = released.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, want, atol=1e-5)

    minilm = {**model_group("minilm_lora"), "pooling": "pooler", "normalize": None}
    released = released_of(minilm, LABELS)
    want = logits_of(released)
    assert write_model(released, tmp_path / "adapter", merge=False) == ("peft", False)
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_dir()  # loadable offline here
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(
        tmp_path / "adapter",
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    ).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, want)


@pytest.mark.parametrize("labels", [LABELS, LABELS[:2]], ids=["3-class", "binary"])
def test_lora_under_a_pooled_head_is_merged_into_setfit(tmp_path, labels):
    """sklearn's binary head is one logit: its probabilities must still be our softmax."""
    from setfit import SetFitModel

    from server.release.export import write_model

    pooled = {**model_group("tiny_bert"), "freeze_encoder": False, "lora": TINY_LORA}
    released = released_of(pooled, labels)
    want = logits_of(released).softmax(-1).double()
    assert write_model(released, tmp_path / "out", merge=False) == ("setfit", True)
    got = SetFitModel.from_pretrained(str(tmp_path / "out")).predict_proba(TEXTS, as_numpy=True)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)
