"""Fisher diagonals, SFRon's Fisher-ratio saliency mask (reference §2.1.1), mask files, gradient masking."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion_unlearn.fileio import UserError, atomic_path, load_pickled_checkpoint, strip_prefix

Mask = dict[str, torch.Tensor]  # parameter name → bool tensor of the parameter's shape


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(backbone, dataset, *, batch_size: int, max_batches: int | None = None,
                    guidance_w: float | None = None, clip: float | None = None, seed: int = 0,
                    desc: str = "fisher") -> Mask:
    """F[i] = mean over batches of (∂L_batch/∂θ_i)², L_batch the batch mean of the per-sample loss.

    Correct default: the conditional ε, no label dropout, no clipping, model in eval mode. The reference
    (§2.1.1) takes the loss on the guided output (`guidance_w=2`) and clips each batch gradient to norm 1
    (`clip=1.0`); the paper's γ = 3 was tuned on that variant, so its preset turns both on.
    """
    model = backbone.model
    params = trainable_parameters(model)
    names, tensors = list(params), list(params.values())
    fisher = [torch.zeros_like(p) for p in tensors]
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,) a fixed shuffle
    starts = list(range(0, n, batch_size))[: max_batches or None]
    was_training = model.training
    model.eval()
    device = tensors[0].device
    for start in tqdm(starts, desc=desc, leave=False):
        idx = order[start:start + batch_size]
        x, y = dataset.get_batch(idx)  # (B, C, H, W), (B,)
        model.zero_grad(set_to_none=True)
        backbone.per_sample_loss(x.to(device), y.to(device), guidance_w=guidance_w).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
        torch._foreach_addcmul_(fisher, grads, grads, value=1.0 / len(starts))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return dict(zip(names, fisher))


def ratio_mask(forget_fisher: Mask, retain_fisher: Mask, gamma: float) -> Mask:
    """m = ((F_f + 1e-15) / (F_r + 1e-15) ≥ γ), per parameter (paper γ = 3)."""
    return {k: (forget_fisher[k] + 1e-15) / (retain_fisher[k] + 1e-15) >= gamma for k in forget_fisher}


def compute_mask(backbone, forget_set, retain_set, cfg) -> Mask:
    """SFRon mask from a MaskConfig: forget and retain Fisher diagonals, then the ratio test."""
    kw = dict(batch_size=cfg.fisher_batch_size, max_batches=cfg.fisher_max_batches, clip=cfg.fisher_clip,
              guidance_w=cfg.fisher_guidance_w if cfg.fisher_on_guided_output else None, seed=cfg.seed)
    forget = fisher_diagonal(backbone, forget_set, desc="Fisher (forget set)", **kw)
    retain = fisher_diagonal(backbone, retain_set, desc="Fisher (retain set)", **kw)
    return ratio_mask(forget, retain, cfg.gamma)


def mask_density(mask: Mask) -> float:
    """Fraction of coordinates the mask lets move."""
    total = sum(m.numel() for m in mask.values())
    return float(sum(m.sum().item() for m in mask.values()) / max(total, 1))


def save_mask(path: str | Path, mask: Mask, metadata: dict) -> None:
    meta = {k: json.dumps(v) for k, v in {**metadata, "density": mask_density(mask)}.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in mask.items()}, str(tmp), metadata=meta)


def load_mask(path: str | Path, model: torch.nn.Module | None = None, *, trust_pickle: bool = False) -> Mask:
    """Read our `.safetensors` masks or the lineage's `.pt` masks (bool `fisher_<γ>.pt`, SalUn's int64
    `with_0.5.pt`; `module.` stripped). With `model`, names and shapes are checked against it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask file not found: {path} (make one with `diffusion-unlearn mask`)")
    if path.suffix == ".safetensors":
        raw = load_file(str(path))
    else:
        raw = load_pickled_checkpoint(path, trust_pickle=trust_pickle)
        if not isinstance(raw, dict):
            raise UserError(f"{path} does not hold a dict of parameter name → mask tensor")
        raw = {k: v for k, v in strip_prefix(raw).items() if isinstance(v, torch.Tensor)}
    mask = {k: v != 0 for k, v in raw.items()}
    if model is not None:
        params = trainable_parameters(model)
        missing = sorted(set(params) - set(mask))
        if missing:
            raise UserError(f"mask {path} has no entry for {len(missing)} parameters (e.g. {missing[0]}); "
                            "it was made for a different model")
        for k, p in params.items():
            if mask[k].shape != p.shape:
                raise UserError(f"mask {path}: {k} has shape {tuple(mask[k].shape)}, the model {tuple(p.shape)}")
        mask = {k: mask[k] for k in params}
    return mask


def mask_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


class GradientMask:
    """Multiplies gradients by a fixed 0/1 mask in one fused op (`g ← g ⊙ m`)."""

    def __init__(self, model: torch.nn.Module, mask: Mask):
        params = trainable_parameters(model)
        self.params = list(params.values())
        self.factors = [mask[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()]

    def apply(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self.params, self.factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))
