"""The distilling step-by-step loss, shared by every student family."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of target tokens), ignoring -100 padding."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def multitask_loss(pred: tuple, expl: tuple | None, alpha: float, n_label: int, n_rationale: int,
                   scale: float = 1.0) -> torch.Tensor:
    """alpha * L_label + (1 - alpha) * L_rationale, each the mean over the target tokens of the whole
    global batch (n_label, n_rationale), so split micro-batches and workers add up to exactly the
    loss of one big batch. `scale` is the world size: DDP and DeepSpeed average gradients over ranks."""
    label_sum, _ = pred
    if expl is None:
        return label_sum / n_label * scale
    rationale_sum, _ = expl
    return (alpha * label_sum / n_label + (1 - alpha) * rationale_sum / max(n_rationale, 1)) * scale
