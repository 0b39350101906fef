"""The loss-landscape measurements of Santurkar et al. (2018, section 3.1, Figure 4), taken
along the training trajectory by a probe.

Every ``every`` steps, before the optimizer step, at the current weights ``w`` and on the
step's own mini-batch (BN in training mode, as the step sees it), with ``g = ∇L(w)``:

* **loss variation**: ``L(w - η g)`` for each step size ``η`` of ``etas``; the figure shades
  the range (min to max over ``η``) at each point of the trajectory;
* **gradient predictiveness**: ``‖∇L(w - η g) - g‖`` for each ``η``, also shaded as a range;
* **effective β-smoothness**: ``max over η of ‖∇L(w - η g) - g‖ / ‖η g‖``, the largest
  change of the gradient per unit of distance moved along it.

The weights, gradients and every buffer (BN running statistics, step counters) are
restored afterwards: the training run is the same with or without the probe (its random
draws aside: noise layers draw more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.lab.probes import Probe

#: The step sizes of the measurements, as multiples of the training learning rate: the
#: paper moves up to a few times the step it takes (Figure 4 spans 0.05 to 0.4 at lr 0.1).
ETA_FACTORS = (0.5, 1.0, 2.0, 4.0)


class LossLandscape(Probe):
    """See the module docstring. ``etas``: absolute step sizes; ``loss_fn(logits, y)``."""

    def __init__(
        self,
        etas: Sequence[float],
        every: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    ) -> None:
        if not etas or min(etas) <= 0 or every < 1:
            raise ValueError(
                f"LossLandscape: needs positive etas and every >= 1, got {etas}, {every}."
            )
        self.etas, self.every, self.loss_fn = tuple(float(e) for e in etas), every, loss_fn
        self.model: nn.Module | None = None
        self.steps: list[int] = []
        self.losses: list[list[float]] = []  # per measurement: L(w) then L(w - η g) per η
        self.grad_changes: list[list[float]] = []  # per measurement: ‖Δg‖ per η
        self.smoothness: list[float] = []

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def before_step(self, step: int, x: Tensor, y: Tensor) -> None:
        if self.model is None or (step - 1) % self.every:
            return
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        try:
            loss, grad = self._loss_and_grad(model, params, x, y)
            norm = torch.sqrt(sum(g.square().sum() for g in grad))
            losses, changes = [loss], []
            for eta in self.etas:
                with torch.no_grad():
                    for p, w, g in zip(params, saved, grad, strict=True):
                        p.copy_(w - eta * g)
                moved_loss, moved_grad = self._loss_and_grad(model, params, x, y)
                losses.append(moved_loss)
                changes.append(
                    torch.sqrt(
                        sum((a - b).square().sum() for a, b in zip(moved_grad, grad, strict=True))
                    )
                )
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        values = torch.stack([*losses, *changes, norm]).tolist()  # one host sync
        loss_values, change_values, g_norm = (
            values[: len(losses)],
            values[len(losses) : -1],
            values[-1],
        )
        self.steps.append(step - 1)  # weights after step - 1 optimizer steps
        self.losses.append(loss_values)
        self.grad_changes.append(change_values)
        self.smoothness.append(
            max(c / (eta * g_norm) for c, eta in zip(change_values, self.etas, strict=True))
            if g_norm > 0
            else 0.0
        )

    def _loss_and_grad(
        self, model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        loss = self.loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]

    def result(self) -> dict[str, Any]:
        return {
            "etas": list(self.etas),
            "steps": list(self.steps),
            "loss": [row[0] for row in self.losses],
            "moved_losses": [row[1:] for row in self.losses],
            "gradient_changes": self.grad_changes,
            "beta_smoothness": self.smoothness,
        }
