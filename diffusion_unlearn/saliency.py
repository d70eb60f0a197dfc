"""Fisher diagonals (SFRon §2.1.1, SA §2.3), saliency masks (SFRon's Fisher ratio, SalUn's top-k §2.2), mask files,
gradient masking.

Any number of processes, the same mask (`mask` under `accelerate launch`): the batches of the fixed shuffle are
split, batch b to process b mod N, and their gradients are summed so that the sums, and the mask, are bitwise
those of one process:
- every batch's random draws (timesteps, noise, label dropout, a latent backbone's posterior sample) come from the
  global RNG seeded for that batch alone with `image_seed(seed, b)` (restored afterwards), so a batch's gradient
  depends neither on the process that computes it nor on the batches computed before;
- the sums are made by gathering, not by reducing partial sums: each round, every process's batch gradient is
  all-gathered in flat buckets (≤ BUCKET elements), and every process adds the round's gradients into flat
  accumulators in batch order. The N-process sum is then the same float operations in the same order as the
  one-process sum, which takes the same path (same buckets, same order) without the gather. We chose this over
  float64 partial sums all-reduced: regrouped float64 sums still round differently, rarely but possibly by a
  float32 ulp after the cast, and a mask compares every entry with a threshold. The cost is one all-gather of N
  gradients a round (N/2 times what a DDP all-reduce moves) and N × BUCKET elements of temporaries.
Equal gradients per batch need the same device kind and deterministic kernels on every process (on a GPU: no
non-deterministic cuDNN algorithms; on the CPU: the same thread count).

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffusion_unlearn.eval.sample_store import OneProcess, Processes
from diffusion_unlearn.fileio import UserError, load_pickled_checkpoint, save_safetensors_atomic, strip_prefix
from diffusion_unlearn.parameters import named_trainable_parameters
from diffusion_unlearn.seeds import image_seed

Mask = dict[str, torch.Tensor]  # parameter name → bool tensor of the parameter's shape
Update = Callable[[torch.Tensor, torch.Tensor], None]  # (flat sum (S,), one unit's flat gradient (S,)) → in place

BUCKET = 1 << 24  # elements of flattened gradients gathered at once: bounds the temporaries to N × 64 MB (fp32)


def _buckets(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Consecutive parameter indices in groups of one dtype and at most BUCKET elements (a larger one alone)."""
    groups: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        if not groups or size + t.numel() > BUCKET or t.dtype != tensors[groups[-1][0]].dtype:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.numel()
    return groups


def _gathered(flat: torch.Tensor, processes: Processes) -> list[torch.Tensor]:
    """Every process's `flat` (S,), in process order."""
    if processes.num_processes == 1:
        return [flat]
    parts = [torch.empty_like(flat) for _ in range(processes.num_processes)]
    dist.all_gather(parts, flat)
    return parts


def _sum_over_units(params: dict[str, torch.Tensor], count: int, gradient: Callable[[int], list[torch.Tensor]],
                    update: Update, processes: Processes, desc: str) -> dict[str, torch.Tensor]:
    """Σ over units u = 0 … count−1 of `gradient(u)` (one tensor per parameter), folded into zeros with `update`
    in unit order on flat per-bucket sums; unit u computed by process u mod N, the gradients gathered (module
    docstring). Every process returns the same sums, shaped as the parameters."""
    tensors = list(params.values())
    buckets = _buckets(tensors)
    sums = [torch.zeros(sum(tensors[i].numel() for i in b), dtype=tensors[b[0]].dtype, device=tensors[b[0]].device)
            for b in buckets]  # (S_k,) each
    rank, size = processes.process_index, processes.num_processes
    for start in tqdm(range(0, count, size), desc=desc, leave=False, disable=not processes.is_main_process):
        grads = gradient(start + rank) if start + rank < count else None
        for bucket, total in zip(buckets, sums):
            flat = torch.cat([grads[i].reshape(-1) for i in bucket]) if grads else torch.zeros_like(total)  # (S_k,)
            for part in _gathered(flat, processes)[:count - start]:  # unit start + j from process j
                update(total, part)
    out = {}
    names = list(params)
    for bucket in buckets:  # own tensors (a file cannot save views of one buffer); one bucket copied at a time
        total, offset = sums.pop(0), 0
        for i in bucket:
            out[names[i]] = total[offset:offset + tensors[i].numel()].view(tensors[i].shape).clone()
            offset += tensors[i].numel()
    return out


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (CPU, and `device` when CUDA) seeded with `seed` inside the block, restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _batch_gradient_sum(backbone, dataset, update: Callable[[int], Update], *, batch_size: int,
                        max_batches: int | None, guidance_w: float | None, clip: float | None, seed: int, desc: str,
                        processes: Processes | None) -> dict[str, torch.Tensor]:
    """Σ over the batches of a fixed shuffle of `dataset` of ∇_θ of the batch-mean loss (model in eval mode, each
    batch gradient clipped to global norm `clip` when given), folded with `update(number of batches)`; batch b's
    draws seeded with `image_seed(seed, b)`, split over `processes` (module docstring)."""
    model = backbone.model
    params = named_trainable_parameters(model)
    tensors = list(params.values())
    device = tensors[0].device
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # (N,) a fixed shuffle
    batches = [order[s:s + batch_size] for s in range(0, len(dataset), batch_size)][: max_batches or None]

    def gradient(b: int) -> list[torch.Tensor]:
        x, y = dataset.get_batch(batches[b])  # (B, C, H, W), (B,)
        model.zero_grad(set_to_none=True)
        with _seeded(image_seed(seed, b), device):
            backbone.per_sample_loss(x.to(device), y.to(device), guidance_w=guidance_w).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]

    was_training = model.training
    model.eval()
    try:
        return _sum_over_units(params, len(batches), gradient, update(len(batches)), processes or OneProcess(), desc)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def fisher_diagonal(backbone, dataset, *, batch_size: int, max_batches: int | None = None,
                    guidance_w: float | None = None, clip: float | None = None, seed: int = 0,
                    desc: str = "fisher", processes: Processes | None = None) -> Mask:
    """F[i] = mean over batches of (∂L_batch/∂θ_i)², L_batch the batch mean of the per-sample loss; the batches
    split over `processes` (one when None), the same F for any number (module docstring).

    Correct default: the conditional ε, no label dropout, no clipping, model in eval mode. The reference
    (§2.1.1) takes the loss on the guided output (`guidance_w=2`) and clips each batch gradient to norm 1
    (`clip=1.0`); the paper's γ = 3 was tuned on that variant, so its preset turns both on.
    """
    def update(n: int) -> Update:
        return lambda total, g: total.addcmul_(g, g, value=1.0 / n)

    return _batch_gradient_sum(backbone, dataset, update, batch_size=batch_size, max_batches=max_batches,
                               guidance_w=guidance_w, clip=clip, seed=seed, desc=desc, processes=processes)


def gradient_saliency(backbone, dataset, *, batch_size: int, max_batches: int | None = None,
                      guidance_w: float | None = None, clip: float | None = None, seed: int = 0,
                      desc: str = "saliency", processes: Processes | None = None) -> Mask:
    """s[i] = |Σ_batches ∂L_batch/∂θ_i|: SalUn's saliency on the forget set (reference §2.2: the signed sum of
    the batch gradients, then its magnitude). Quirks and `processes` as `fisher_diagonal`."""
    total = _batch_gradient_sum(backbone, dataset, lambda n: torch.Tensor.add_, batch_size=batch_size,
                                max_batches=max_batches, guidance_w=guidance_w, clip=clip, seed=seed, desc=desc,
                                processes=processes)
    return {n: g.abs_() for n, g in total.items()}


def timestep_summed_fisher(backbone, images: torch.Tensor, labels: torch.Tensor, *, timesteps: int, chunk: int,
                           cfg_dropout: float = 0.0, seed: int = 0, desc: str = "SA Fisher",
                           processes: Processes | None = None) -> Mask:
    """SA's Fisher diagonal (reference §2.3): F = (1/N) Σ_n (Σ_t ∇_θ ℓ(x_n, t, c_n; ε_{n,t}))², the gradient
    summed over the diffusion steps of one sample before squaring.

    The sum runs over `timesteps` evenly spaced steps of the T training steps (all of them when `timesteps` = T,
    as the reference), scaled by T/`timesteps` so that a subset estimates the full sum. ε_{n,·} (drawn on the CPU)
    and the label dropout of sample n come from the global RNG seeded with `image_seed(seed, n)`, so the samples
    can be split over `processes` (one when None) with the same F for any number (module docstring); the steps
    of a sample go through the model `chunk` at a time, their gradients accumulating between chunks. Model in
    eval mode; `cfg_dropout` is the reference's label dropout (§2.3).
    """
    total = backbone.schedule.num_steps
    if not 1 <= timesteps <= total or chunk < 1:
        raise UserError(f"the SA Fisher needs 1 ≤ --sa-fisher-timesteps ≤ {total} and --sa-fisher-chunk ≥ 1, "
                        f"got {timesteps} and {chunk}")
    params = backbone.named_parameters()
    tensors = list(params.values())
    steps = torch.linspace(0, total - 1, timesteps).round().long().to(images.device)  # (T',) distinct steps
    model = backbone.model

    def gradient(n: int) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with _seeded(image_seed(seed, n), images.device):
            # ε has the shape the model denoises: the images', or a latent DiT's latents
            noise = torch.randn((timesteps, *backbone.sample_shape), dtype=images.dtype).to(images.device)
            for s in range(0, timesteps, chunk):  # noise: (T', C, h, w)
                t = steps[s:s + chunk]  # (c,)
                x = images[n].expand(len(t), *images.shape[1:])  # (c, C, H, W)
                loss = backbone.per_sample_loss(x, labels[n].expand(len(t)), t=t, noise=noise[s:s + chunk],
                                                cfg_dropout=cfg_dropout)  # (c,)
                (loss.sum() * (total / timesteps)).backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]

    def update(fisher: torch.Tensor, g: torch.Tensor) -> None:
        fisher.addcmul_(g, g, value=1.0 / len(images))

    was_training = model.training
    model.eval()
    try:
        return _sum_over_units(params, len(images), gradient, update, processes or OneProcess(), desc)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def ratio_mask(forget_fisher: Mask, retain_fisher: Mask, gamma: float) -> Mask:
    """m = ((F_f + 1e-15) / (F_r + 1e-15) ≥ γ), per parameter (paper γ = 3)."""
    return {k: (forget_fisher[k] + 1e-15) / (retain_fisher[k] + 1e-15) >= gamma for k in forget_fisher}


# ----------------------------------------------------------------------------- top-k without a global sort

TOPK_CHUNK = 1 << 15  # elements per slice in the top-k passes: bounds their temporaries to ~1 MB


def _score_bits(scores: Mask) -> Iterator[torch.Tensor]:
    """The scores as int32 bit patterns, in slices of at most TOPK_CHUNK elements (parameter order, then flat
    index). For finite float32 ≥ +0 the bit pattern orders exactly as the value."""
    for s in scores.values():
        flat = s.detach().reshape(-1)
        for i in range(0, flat.numel(), TOPK_CHUNK):
            bits = flat[i:i + TOPK_CHUNK].float().view(torch.int32)  # (≤ CHUNK,)
            if bits.numel() and (int(bits.min()) < 0 or int(bits.max()) >= 0x7F800000):
                raise UserError("saliency scores must be finite and ≥ 0 (the gradients were not finite: "
                                "lower the learning rate or check the model)")
            yield bits


def _histogram(keys: Iterator[torch.Tensor]) -> torch.Tensor:
    """Counts of 16-bit keys (65536,), accumulated in place over slices."""
    hist = None
    for k in keys:
        counts = torch.bincount(k, minlength=1 << 16)  # (65536,)
        hist = counts if hist is None else hist.add_(counts)
    return hist


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(b, above): the highest bin b with at least k keys in bins ≥ b, and the number of keys in bins > b."""
    below = hist.cumsum(0).sub_(hist)  # (65536,) keys in bins < b, nondecreasing
    total = int(hist.sum())
    b = int(torch.searchsorted(below, torch.tensor([total - k], device=below.device), right=True)) - 1
    return b, total - int(below[b]) - int(hist[b])


def topk_threshold(scores: Mask, k: int) -> tuple[float, int]:
    """(τ, r): τ the k-th largest score over all tensors, r how many of the entries equal to τ belong to the
    top k (the rest of the top k is every entry > τ). Exact, by a two-pass radix select on the float32 bit
    patterns (high 16 bits, then low 16 bits among the entries in the chosen high bin): two histograms of 2^16
    bins and one slice of temporaries, never a sort or a copy of all the scores. Requires 1 ≤ k ≤ N."""
    high, above = _bin_of_kth(_histogram(bits >> 16 for bits in _score_bits(scores)), k)
    low_hist = _histogram(bits[(bits >> 16) == high] & 0xFFFF for bits in _score_bits(scores))  # in the high bin
    low, above_low = _bin_of_kth(low_hist, k - above)
    tau = torch.tensor([high << 16 | low], dtype=torch.int32).view(torch.float32)
    return float(tau), k - above - above_low


def topk_mask(scores: Mask, fraction: float) -> Mask:
    """m = 1 on exactly k = ⌊fraction·N⌋ entries, those with the largest scores across the whole network
    (SalUn's top-k mask, reference §2.2, which ranks by a global argsort). Ties at the threshold go to the
    earliest entries in parameter order, then flat index: the set a stable descending sort would pick."""
    n = sum(s.numel() for s in scores.values())
    k = int(fraction * n)
    if not 0 <= k <= n:
        raise UserError(f"top-k fraction must be in [0, 1], got {fraction}")
    if k in (0, n):
        return {name: torch.full_like(s, k == n, dtype=torch.bool) for name, s in scores.items()}
    tau, ties = topk_threshold(scores, k)
    tau_bits = int(torch.tensor([tau], dtype=torch.float32).view(torch.int32))
    mask = {name: torch.empty_like(s, dtype=torch.bool) for name, s in scores.items()}
    slices = (m.view(-1)[i:i + TOPK_CHUNK] for m in mask.values() for i in range(0, m.numel(), TOPK_CHUNK))
    for bits, out in zip(_score_bits(scores), slices):
        equal = bits == tau_bits  # (≤ CHUNK,)
        take = equal & (equal.cumsum(0) <= ties)  # the first `ties` entries equal to τ
        ties -= int(take.sum())
        torch.logical_or(bits > tau_bits, take, out=out)
    return mask


def compute_mask(backbone, forget_set, retain_set, cfg, kind: str, seed: int,
                 processes: Processes | None = None) -> Mask:
    """The saliency mask of `kind` with the settings `cfg` (config.MaskSettings): SFRon's Fisher ratio
    (`fisher-ratio`, §2.1.1: forget and retain Fisher diagonals, then the ratio test) or SalUn's top-k gradient
    saliency on the forget set (`topk`, §2.2). The batches are split over `processes` (one when None), the mask
    the same for any number of them; `backbone.model` must not be DDP-wrapped (each process has its own batch)."""
    kw = dict(batch_size=cfg.fisher_batch_size, max_batches=cfg.fisher_max_batches, clip=cfg.fisher_clip,
              guidance_w=cfg.fisher_guidance_w if cfg.fisher_on_guided_output else None, seed=seed,
              processes=processes)
    if kind == "topk":
        return topk_mask(gradient_saliency(backbone, forget_set, desc="saliency (forget set)", **kw),
                         cfg.topk_fraction)
    forget = fisher_diagonal(backbone, forget_set, desc="Fisher (forget set)", **kw)
    retain = fisher_diagonal(backbone, retain_set, desc="Fisher (retain set)", **kw)
    return ratio_mask(forget, retain, cfg.gamma)


def mask_description(cfg, kind: str, forget_class: int) -> dict:
    """What a mask file records about how it was made (`cfg`: config.MaskSettings)."""
    rule = {"gamma": cfg.gamma} if kind == "fisher-ratio" else {"topk_fraction": cfg.topk_fraction}
    return {"kind": kind, "forget_class": forget_class, **rule,
            "fisher_on_guided_output": cfg.fisher_on_guided_output, "fisher_clip": cfg.fisher_clip}


def mask_density(mask: Mask) -> float:
    """Fraction of coordinates the mask lets move."""
    total = sum(m.numel() for m in mask.values())
    return float(sum(m.sum().item() for m in mask.values()) / max(total, 1))


def save_mask(path: str | Path, mask: Mask, metadata: dict) -> None:
    meta = {k: json.dumps(v) for k, v in {**metadata, "density": mask_density(mask)}.items()}
    save_safetensors_atomic({k: v.to(torch.uint8) for k, v in mask.items()}, path, metadata=meta)


def read_tensor_file(path: str | Path, *, trust_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """Parameter name → tensor from our `.safetensors` or the lineage's `.pt` files (masks, Fisher diagonals),
    `module.` stripped (reference §7.22); `.pt` files load on the CPU, `weights_only` unless `trust_pickle`
    (None: the command has no `--trust-pickle` option, `load_pickled_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask file not found: {path} (make one with `diffusion-unlearn mask`)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:120]}); "
                            "pass a mask file made by `diffusion-unlearn mask` or `convert`") from e
    raw = load_pickled_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a dict of parameter name → tensor")
    return {k: v for k, v in strip_prefix(raw).items() if isinstance(v, torch.Tensor)}


def load_mask(path: str | Path, model: torch.nn.Module | None = None, *, trust_pickle: bool | None = None) -> Mask:
    """Read our `.safetensors` masks or the lineage's `.pt` masks (bool `fisher_<γ>.pt`, SalUn's int64
    `with_0.5.pt`; `module.` stripped). With `model`, names and shapes are checked against it."""
    mask = {k: v != 0 for k, v in read_tensor_file(path, trust_pickle=trust_pickle).items()}
    if model is not None:
        params = named_trainable_parameters(model)
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
    """Multiplies gradients by a fixed 0/1 mask in one fused op (`g ← g ⊙ m`).

    The factors stay bool (1 byte a weight, the mask's own tensors when already on the parameter's device), not
    copies in the parameter dtype: 2.7 GB less for DiT-XL/2 in fp32. `g · True = g`, `g · False = 0` (NaN and
    inf to NaN), bitwise as the float factors gave."""

    def __init__(self, model: torch.nn.Module, mask: Mask):
        params = named_trainable_parameters(model)
        self.params = list(params.values())
        self.factors = [mask[n].to(device=p.device, dtype=torch.bool) for n, p in params.items()]

    def apply(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self.params, self.factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))
