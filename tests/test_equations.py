"""Equations on known inputs: noise schedule, antithetic steps, adaptive GA, α schedule, ratio mask, CFG."""

import math

import numpy as np
import pytest
import torch

from diffusion_unlearn.diffusion import NoiseSchedule, antithetic_timesteps, linear_betas
from diffusion_unlearn.methods.sfron import SFRon, adaptive_weights
from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.pipelines.backbone import DDPMBackbone, drop_labels
from diffusion_unlearn.pipelines.pipeline_class_conditional import (guided_eps, sampling_scheduler,
                                                                    training_scheduler)
from diffusion_unlearn.saliency import ratio_mask
from diffusion_unlearn.unlearn import alpha_at


def test_betas_are_float64_linspace_cast_to_float32():
    ref = np.linspace(1e-4, 0.02, 1000, dtype=np.float64).astype(np.float32)
    assert torch.equal(linear_betas(), torch.from_numpy(ref))
    # diffusers' own float32 linspace differs in the last bits: we must not use it
    f32 = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    assert not torch.equal(linear_betas(), f32)


def test_schedulers_carry_the_reference_betas_and_never_clip():
    sched = training_scheduler()
    assert torch.equal(sched.betas, linear_betas())
    assert torch.equal(sched.alphas_cumprod, NoiseSchedule().alphas_cumprod)
    for name in ("ddim", "ddpm"):
        s = sampling_scheduler(sched.config, name)
        assert s.config.clip_sample is False
        assert torch.equal(s.alphas_cumprod, NoiseSchedule().alphas_cumprod)


def test_q_sample_matches_closed_form():
    sched = NoiseSchedule()
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 999])
    a = sched.alphas_cumprod[t]
    expected = a.sqrt().view(-1, 1, 1, 1) * 1.0 + (1 - a).sqrt().view(-1, 1, 1, 1) * 2.0
    assert torch.allclose(sched.q_sample(x0, t, noise), expected)
    assert math.isclose(float(sched.alphas_cumprod[0]), 1 - 1e-4, rel_tol=1e-6)  # ᾱ_0 = 1 − β_0


def test_antithetic_timesteps_pair_up():
    torch.manual_seed(0)
    t = antithetic_timesteps(8, 1000)
    assert t.shape == (8,)
    first = t[:5]
    assert torch.equal(t[5:], (999 - first)[:3])
    t = antithetic_timesteps(7, 1000)
    assert torch.equal(t[4:], 999 - t[:3])


def test_adaptive_weights_favour_small_losses():
    losses = torch.tensor([1.0, 4.0, 16.0])
    w = adaptive_weights(losses, 0.5)
    inv = torch.tensor([1.0, 0.5, 0.25])  # ℓ^{-1/2}
    assert torch.allclose(w, inv / inv.sum(), atol=1e-6)
    assert torch.allclose(adaptive_weights(losses, 0.0), torch.full((3,), 1 / 3))  # λ = 0 is plain GA


class _FixedLossBackbone:
    """Per-sample losses fixed by the test, to pin the SFRon losses."""

    def __init__(self, losses):
        self.losses, self.calls = losses, []

    def per_sample_loss(self, x, y, *, cfg_dropout=0.0, guidance_w=None):
        self.calls.append(cfg_dropout)
        return self.losses


def test_sfron_forget_loss_is_weighted_ascent_and_dropout_switch():
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    backbone = _FixedLossBackbone(losses)
    method = SFRon(adaptive_lambda=0.5)
    loss = method.forget_loss(backbone, None, None)
    w = torch.tensor([1.0, 0.5]) / 1.5
    assert torch.isclose(loss, -(w * torch.tensor([1.0, 4.0])).sum())
    loss.backward()
    assert torch.allclose(losses.grad, -w)  # weights are detached
    assert backbone.calls == [0.0]  # correct default: no CFG dropout in the forget loss
    SFRon(cfg_dropout_in_forget_loss=True).forget_loss(backbone, None, None)
    assert backbone.calls[-1] == 0.1  # reference quirk §7.6
    assert torch.isclose(SFRon(retain_alpha=2.0).retain_loss(backbone, None, None), torch.tensor(5.0))
    assert backbone.calls[-1] == 0.1  # retain loss keeps the pretraining dropout


def test_alpha_cosine_schedule():
    assert alpha_at(0, 150, 1.0, "cosine") == 1.0
    assert math.isclose(alpha_at(75, 150, 1.0, "cosine"), 0.5)
    assert math.isclose(alpha_at(149, 150, 2.0, "cosine"), 2.0 * (1 + math.cos(math.pi * 149 / 150)) / 2)
    assert alpha_at(100, 150, 3.0, "constant") == 3.0


def test_ratio_mask_threshold():
    ff = {"w": torch.tensor([3.0, 2.9, 0.0, 1e-20])}
    fr = {"w": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    m = ratio_mask(ff, fr, 3.0)["w"]
    # 3/1 ≥ 3; 2.9 < 3; (0+1e-15)/(0+1e-15) = 1 < 3; (1e-20+1e-15)/1e-15 ≈ 1 < 3
    assert m.tolist() == [True, False, False, False]
    assert m.dtype == torch.bool


def test_label_dropout_rate_and_null_index():
    torch.manual_seed(0)
    y = torch.zeros(20000, dtype=torch.long)
    d = drop_labels(y, 0.1, 10)
    assert set(d.unique().tolist()) == {0, 10}
    assert abs((d == 10).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 10), y)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return ClassConditionalUNet.from_preset("tiny").eval()


def test_guidance_conventions_and_batched_forward(tiny_unet):
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        c = tiny_unet(x, t, y)
        u = tiny_unet(x, t, torch.full_like(y, 10))
        s = guided_eps(tiny_unet, x, t, y, 3.0, 10)
    # standard s = 3 ≡ lineage w = 2: (1 + w)ε_c − wε_u
    assert torch.allclose(s, 3 * c - 2 * u, atol=1e-5)
    assert torch.allclose(s, u + 3 * (c - u), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(guided_eps(tiny_unet, x, t, y, 1.0, 10), c)


def test_guided_loss_uses_guided_output(tiny_unet):
    backbone = DDPMBackbone(tiny_unet)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    a = backbone.per_sample_loss(x, y)
    torch.manual_seed(5)
    b = backbone.per_sample_loss(x, y, guidance_w=2.0)
    assert a.shape == b.shape == (4,)
    assert not torch.allclose(a, b)
    torch.manual_seed(5)
    assert torch.equal(a, backbone.per_sample_loss(x, y))  # deterministic under the global seed


def test_fisher_quirk_switches_change_the_diagonal(tiny_model):
    """Reference quirks §7.7: per-batch clipping bounds Σ F by clip² and the guided loss gives another F."""
    from diffusion_unlearn.data import load_dataset
    from diffusion_unlearn.modelfolder import load_model_folder
    from diffusion_unlearn.saliency import fisher_diagonal

    backbone = DDPMBackbone(load_model_folder(tiny_model).denoiser)
    data = load_dataset("digits").with_classes([3])
    kw = dict(batch_size=16, max_batches=2, seed=0)
    total = lambda f: sum(float(v.sum()) for v in f.values())  # noqa: E731
    torch.manual_seed(0)
    plain = total(fisher_diagonal(backbone, data, **kw))
    torch.manual_seed(0)
    clipped = total(fisher_diagonal(backbone, data, clip=1e-3, **kw))
    torch.manual_seed(0)
    guided = total(fisher_diagonal(backbone, data, guidance_w=2.0, **kw))
    assert clipped <= 1e-6 * 1.001 < plain  # mean over batches of ‖clip(g)‖² ≤ clip²
    assert not math.isclose(guided, plain, rel_tol=1e-3)
