"""Classification metrics of generated images: forget accuracy (FA), retained accuracy and friends.

FA follows the reference (`classifier_evaluation.py`): the fraction of images generated for the forgotten
class that the classifier assigns to it. Unlike the reference, the entropy is NaN-free (entr(0) = 0).
"""

from __future__ import annotations

import torch

from diffusion_unlearn.fileio import UserError


def classification_metrics(logits: torch.Tensor, requested: torch.Tensor, forget_class: int) -> dict:
    """Metrics of images generated for the labels `requested` (N,), classified with `logits` (N, K).

    A metric over an empty group (no forget-class or no retained-class images) is None.
    """
    if logits.ndim != 2 or requested.shape != logits.shape[:1]:
        raise UserError(f"logits {tuple(logits.shape)} and labels {tuple(requested.shape)} do not pair up")
    k = logits.shape[1]
    if not 0 <= forget_class < k:
        raise UserError(f"forget class {forget_class} is not one of the classifier's {k} classes (0..{k - 1})")
    probs = logits.double().softmax(1)  # (N, K)
    pred = logits.argmax(1)  # (N,)
    entropy = torch.special.entr(probs).sum(1)  # (N,)
    forget = requested == forget_class  # (N,)
    correct = (pred == requested).double()  # (N,)

    counts = torch.bincount(requested, minlength=k)  # (K,)
    hits = torch.bincount(requested, weights=correct, minlength=k)  # (K,)
    present = counts.nonzero().squeeze(1).tolist()
    return {
        "fa": _mean((pred == forget_class).double()[forget]),
        "retain_accuracy": _mean(correct[~forget]),
        "forget_mean_prob": _mean(probs[forget, forget_class]),
        "forget_mean_entropy": _mean(entropy[forget]),
        "per_class_accuracy": {c: (hits[c] / counts[c]).item() for c in present},
        "n_forget": int(forget.sum()),
        "n_retain": int((~forget).sum()),
    }


def _mean(x: torch.Tensor) -> float | None:
    return x.mean().item() if x.numel() else None
