"""What the released model attends to: predictions, attention maps and token attributions.

``fedpriv explain RUN_DIR --text ...`` runs the run's released global model
(``server.release.released``) on the given texts and nothing else, so the page it writes
releases no client data beyond what the model itself already released.

Per text: the predicted class and its softmax probability; the attention maps of every
layer and head exactly as the model computes them (HF's own ``attentions`` output); and
one token-level summary, **leave-one-out**: how much the predicted class's probability
drops when the model reads the text without that token. Positive: the token pushes the
model towards its prediction; negative: away from it. It is exact (no approximation to
converge) and reads in plain words; attention weights say where the model looks, not
what decides. Gradient-based scores missed a planted word that it found (docs/server.md).
Its blind spot: a token whose information another token repeats scores near zero.

Each text is run alone, truncated at ``train.max_length`` and never padded, so no
padding token appears in the maps or the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.model.state import model_inputs

#: Variants of a text per forward pass in :func:`leave_one_out`: T up to train.max_length
#: (128 by default) would otherwise be one batch of T x T tokens.
LOO_CHUNK = 32


@dataclass
class Explanation:
    text: str
    tokens: list[str]  # the tokenizer's own pieces, special tokens included
    special: list[bool]  # True for [CLS], [SEP] and the like
    label: str  # the predicted class
    probability: float  # its softmax probability
    probabilities: dict[str, float]  # every class, in label order
    attentions: np.ndarray  # [layers, heads, T, T]; row i: where token i attends
    scores: np.ndarray  # [T] how much the predicted class's probability drops without the token

    def top_tokens(self, k: int = 3) -> list[str]:
        """The ``k`` non-special tokens that push hardest towards the prediction."""
        order = [int(i) for i in np.argsort(-self.scores) if not self.special[int(i)]]
        return [self.tokens[i] for i in order[:k]]


def encoder_of(model: nn.Module) -> nn.Module:
    """The HF base encoder inside ``model`` (BertModel in PooledClassifier, HF's classifier, peft).

    It is the module whose forward collects the attention weights; HF marks a base
    model by ``base_model`` being the module itself.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "base_model", None) is module:
            return module
    raise TypeError(f"{type(model).__name__} holds no Hugging Face encoder to explain")


@contextmanager
def _eager_attentions(encoder: nn.Module):
    """Eager attention, for this pass only.

    SDPA (transformers 5's default) fuses the softmax and returns no weights; the eager
    implementation computes the same attention and returns them. The setting lives in
    the config the whole model shares, so it is restored afterwards.
    """
    before = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        encoder.set_attn_implementation(before)


def explain_texts(
    model: nn.Module, tokenizer, label_names: Sequence[str], max_length: int, texts: Sequence[str]
) -> list[Explanation]:
    """One :class:`Explanation` per text, from ``model`` (left in the mode it came in)."""
    if not texts:
        raise ValueError("no text to explain")
    encoder = encoder_of(model)
    was_training = model.training
    model.eval()
    try:
        with _eager_attentions(encoder):
            return [_explain_one(model, encoder, tokenizer, list(label_names), max_length, text) for text in texts]
    finally:
        model.train(was_training)


def _explain_one(model, encoder, tokenizer, label_names, max_length, text) -> Explanation:
    enc = tokenizer([text], truncation=True, max_length=int(max_length), return_tensors="pt")
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    captured: dict[str, object] = {}

    def ask_attentions(_module, args, kwargs):
        # Asked of the encoder itself: peft's classifier passes output_attentions=None
        # down explicitly, which would override a config default.
        return args, {**kwargs, "output_attentions": True}

    def keep_attentions(_module, _inputs, output):
        captured["attentions"] = output.attentions

    hooks = [
        encoder.register_forward_pre_hook(ask_attentions, with_kwargs=True),
        encoder.register_forward_hook(keep_attentions),
    ]
    try:
        with torch.no_grad():
            logits = model(**model_inputs(ids, torch.ones_like(ids))).logits[0].double()
    finally:
        for hook in hooks:
            hook.remove()
    attentions = captured.get("attentions")
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(f"{type(encoder).__name__} returned no attention weights under eager attention")
    if len(label_names) != len(logits):
        raise ValueError(f"the model has {len(logits)} classes but {len(label_names)} label names were given")
    predicted = int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1).cpu().numpy()
    id_list = ids[0].tolist()
    special_ids = set(tokenizer.all_special_ids)
    return Explanation(
        text=text,
        tokens=tokenizer.convert_ids_to_tokens(id_list),
        special=[i in special_ids for i in id_list],
        label=label_names[predicted],
        probability=float(probs[predicted]),
        probabilities={name: float(p) for name, p in zip(label_names, probs)},
        attentions=torch.stack([a[0] for a in attentions]).detach().double().cpu().numpy(),
        scores=leave_one_out(model, ids, predicted, float(probs[predicted])),
    )


def leave_one_out(
    model: nn.Module, ids: torch.Tensor, target: int, probability: float, chunk: int = LOO_CHUNK
) -> np.ndarray:
    """Per token of ``ids`` [1, T]: ``probability`` minus class ``target``'s probability with
    that token hidden.

    Hidden means masked out of the attention (no token attends to it, mean pooling skips
    it) at its own position, the way the model already ignores padding; the rest of the
    text is read as before. T variants of the text run in batches of ``chunk``.
    """
    length = ids.shape[1]
    hidden = 1 - torch.eye(length, dtype=torch.long, device=ids.device)  # row i hides token i
    dropped = []
    with torch.no_grad():
        for start in range(0, length, chunk):
            mask = hidden[start : start + chunk]
            logits = model(**model_inputs(ids.expand(len(mask), -1), mask)).logits.double()
            dropped.append(torch.softmax(logits, dim=-1)[:, target])
    return probability - torch.cat(dropped).cpu().numpy()


def explain_released(released, texts: Sequence[str]) -> list[Explanation]:
    """:func:`explain_texts` for a :class:`server.release.released.Released`."""
    return explain_texts(
        released.model, released.tokenizer, released.label_names, int(released.cfg["train"]["max_length"]), texts
    )
