"""A leaner first backward pass for Opacus' ghost clipping (train.grad_sample_mode=ghost).

Opacus' ghost clipping runs two backward passes: the first only has to deliver each
trainable layer's output gradients to its hooks (which compute per-example gradient
*norms* from them and the stored activations), the second computes the clipped sum.
Opacus runs the first as a plain ``loss.backward()``, so it also computes every weight
gradient (the B·T·d_in·d_out matrix products, about half of a backward pass) and then
throws them away.

Here the first pass asks autograd only for the smallest trainable parameter of each
trainable layer (its bias, for Linear and LayerNorm). Every layer's output gradient is
still computed — each layer's own parameter depends on it — so every hook fires with
the same inputs, and the norms, the clipping coefficients, the noise and the
accounting are exactly Opacus'; the weight-gradient products are skipped.
"""

from __future__ import annotations

import torch
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_modules


class _LeanLoss(DPTensorFastGradientClipping):
    def backward(self):
        per_sample = self.loss_per_sample
        reduced = per_sample.mean(dim=0) if self.loss_reduction == "mean" else per_sample.sum(dim=0)
        torch.autograd.grad(reduced, _probe_params(self.module), retain_graph=True, allow_unused=True)
        self.optimizer.zero_grad()
        coeff = self.module.get_clipping_coef().to(per_sample.device)
        # An example whose norm or loss is not finite contributes nothing (client.training.dp_train).
        keep = torch.isfinite(coeff) & torch.isfinite(per_sample)
        second = torch.sum(torch.where(keep, coeff * per_sample, torch.zeros_like(per_sample)))
        self.module.disable_hooks()
        try:
            second.backward()
        finally:
            self.module.enable_hooks()


def _probe_params(hooks) -> list[torch.Tensor]:
    """One small trainable parameter per trainable layer (cached on the hooks object)."""
    probes = getattr(hooks, "_fedpriv_probes", None)
    if probes is None:
        probes = []
        for _, layer in trainable_modules(hooks._module):
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            probes.append(min(own, key=lambda p: p.numel()))
        hooks._fedpriv_probes = probes
    return probes


class LeanGhostCriterion:
    """Wraps Opacus' ghost-clipping criterion; its losses use the lean first pass."""

    def __init__(self, criterion: DPLossFastGradientClipping):
        self.criterion = criterion

    def __call__(self, *args, **kwargs):
        loss = self.criterion(*args, **kwargs)
        loss.__class__ = _LeanLoss
        return loss
