"""Classifier-free guidance, combined in one place for every backbone, pipeline and loss.

ε̃ = ε_∅ + s(ε_c − ε_∅) (s = 1 + w in the lineage's convention (1+w)ε_c − wε_∅), the conditional and null
halves in one batched forward. With `channels`, only the first `channels` output channels are guided and
the rest (a DiT's remaining ε channels or its variance) come from the conditional half.
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, labels) → output


def guided_output(forward: Forward, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float,
                  null_class: int, channels: int | None = None) -> torch.Tensor:
    """The guided output (B, C_out, H, W) of `forward` at guidance scale `scale`; s = 1 is one plain
    conditional forward."""
    if scale == 1.0:
        return forward(x, t, labels)
    null = torch.full_like(labels, null_class)  # (B,)
    out = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C_out, H, W)
    cond, uncond = out.chunk(2)  # (B, C_out, H, W) each
    k = cond.shape[1] if channels is None else channels
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (B, k, H, W)
    return guided if k == cond.shape[1] else torch.cat([guided, cond[:, k:]], dim=1)
