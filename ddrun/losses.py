"""Classification losses shared by training, unrolled inner loops and objectives (the lowest floor of ddrun)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` float ``[B, K]`` against hard labels (int64 ``[B]``) or soft labels given as
    logits (float ``[B, K]``: the target distribution is ``softmax(targets)``). Returns a float scalar."""
    if targets.dtype.is_floating_point:
        return -(targets.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    return F.cross_entropy(logits, targets)
