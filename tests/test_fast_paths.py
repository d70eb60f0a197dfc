"""The fast paths compute what the reference's plain forms compute (within float rounding: fused kernels sum in
another order), and the hot loops stay on torch's multi-tensor kernels."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from diffusion_unlearn.config import ForgetConfig, build_config
from diffusion_unlearn.data import forget_retain_split, load_dataset
from diffusion_unlearn.models.unet_lineage import AttnBlock, ClassConditionalUNet, nonlinearity
from diffusion_unlearn.optim import FUSED_OPTIMIZERS
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import ClassConditionalPipeline, training_scheduler
from diffusion_unlearn.saliency import GradientMask
from diffusion_unlearn.unlearn import Unlearner


def reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference's attention block: two bmm and a softmax over the H*W positions."""
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    weights = F.softmax(torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * c ** -0.5, dim=2)
    return x + block.proj_out(torch.bmm(v.reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w))


def test_fused_attention_equals_the_reference_form_forward_and_backward():
    torch.manual_seed(0)
    block = AttnBlock(64)
    x = torch.randn(3, 64, 4, 4, requires_grad=True)
    fused, ref = block(x), reference_attention(block, x)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-5)


def test_swish_equals_x_sigmoid_x():
    x = torch.linspace(-20, 20, 10001)
    torch.testing.assert_close(nonlinearity(x), x * torch.sigmoid(x), rtol=1e-6, atol=1e-6)


def test_channels_last_sampling_gives_the_same_images():
    torch.manual_seed(0)
    unet = ClassConditionalUNet.from_preset("tiny")
    pipe = ClassConditionalPipeline(unet=unet, scheduler=training_scheduler())
    kw = dict(num_inference_steps=4, guidance_scale=3.0, seed=1, progress=False)
    last = pipe([0, 3, 10], channels_last=True, **kw)
    plain = pipe([0, 3, 10], channels_last=False, **kw)
    assert last.is_contiguous()
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_iteration_runs_on_multi_tensor_kernels(monkeypatch, optimizer):
    """One SFRon + DualOptim iteration: the optimizer steps never take torch's per-tensor path; the mask, both
    clips and the EMA are a fixed number of multi-tensor calls whatever the number of tensors."""
    from torch.optim import adam, sgd

    def per_tensor(*args, **kwargs):
        raise AssertionError("an optimizer step fell back to torch's per-tensor loop")

    monkeypatch.setattr(adam, "_single_tensor_adam", per_tensor)
    monkeypatch.setattr(sgd, "_single_tensor_sgd", per_tensor)
    calls = {"_foreach_norm": 0, "_foreach_mul_": 0, "_foreach_lerp_": 0, "vector_norm": 0, "mul_": 0, "lerp_": 0}

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("_foreach_norm", "_foreach_mul_", "_foreach_lerp_"):
        counted(torch, name)
    counted(torch.linalg, "vector_norm")
    counted(torch.Tensor, "mul_")  # per-tensor forms of the mask, the clip's scaling and the EMA
    counted(torch.Tensor, "lerp_")

    cfg = build_config(ForgetConfig, dict(dataset="digits", forget_class=3, iterations=2, batch_size=4,
                                          forget_optimizer={"name": optimizer}, retain_optimizer={"name": optimizer}))
    forget_set, retain_set = forget_retain_split(load_dataset("digits"), 3)
    torch.manual_seed(0)
    backbone = DDPMBackbone(ClassConditionalUNet.from_preset("tiny"))
    keep = {n: torch.rand(p.shape) < 0.5 for n, p in backbone.named_parameters().items()}
    learner = Unlearner(cfg, backbone, forget_set, retain_set, GradientMask(backbone.denoiser, keep),
                        Accelerator(cpu=True))
    torch_optimizers = [o for o in learner.optim.optimizers if isinstance(o, torch.optim.Optimizer)]
    kernel = "fused" if optimizer in FUSED_OPTIMIZERS else "foreach"  # one pass per tensor, else multi-tensor
    assert torch_optimizers and all(g[kernel] for o in torch_optimizers for g in o.param_groups)
    for counter in calls:
        calls[counter] = 0
    learner.run_iteration(None)
    clips = 1 + int(cfg.clip_retain)
    assert calls["_foreach_norm"] == clips and calls["vector_norm"] == clips  # one total norm per clip
    # the mask, each clip's scaling (and the optimizers' own multi-tensor steps): a few calls, not one per tensor
    assert 1 + clips <= calls["_foreach_mul_"] <= 8 < len(learner.params)
    assert 1 <= calls["_foreach_lerp_"] <= 8  # the EMA (and a foreach Adam's first moments)
    assert calls["mul_"] + calls["lerp_"] < len(learner.params) // 2  # no loop over the tensors
