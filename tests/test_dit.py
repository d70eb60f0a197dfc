"""The original DiT: golden equality through every checkpoint format, conversions, both samplers, the loss."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding

from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.methods.sfron import SFRon
from diffusion_unlearn.models.convert_dit import (diffusers_config, dit_config_from_state, dit_from_diffusers_state,
                                                  dit_from_original, dit_to_diffusers, dit_to_diffusers_state,
                                                  export_diffusers_pipeline, load_diffusers_dit_folder,
                                                  load_original_dit, save_original_dit)
from diffusion_unlearn.models.dit_transformer import (DIT_SIZES, ClassConditionalDiT, dit_num_params,
                                                      timestep_embedding)
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone
from diffusion_unlearn.pipelines.pipeline_dit import (ClassConditionalDiTPipeline, SpacedDiffusion,
                                                      dit_training_scheduler, guided_dit_output, space_timesteps)

TOL = 1e-5
GOLDEN = "dit-small"




# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def golden(golden_dir):
    """(spec, arrays, original-layout state dict filled by the golden recipe)."""
    spec = json.loads((golden_dir / f"{GOLDEN}.json").read_text())
    arrays = dict(np.load(golden_dir / f"{GOLDEN}.npz"))
    g = torch.Generator().manual_seed(spec["seed"])
    state = {}
    for key, shape in spec["fill_order"]:
        if key == "pos_embed":  # the one `fixed` entry
            state[key] = torch.from_numpy(arrays[key]).clone()
        else:
            state[key] = torch.randn(shape, generator=g) * (0.05 if len(shape) > 1 else 0.1)
    return spec, arrays, state


def _golden_outputs(model, arrays):
    z, t, y = (torch.from_numpy(arrays[k]) for k in ("z", "t", "y"))
    model.eval()
    with torch.no_grad():
        cond = model(z, t, y)
        null = model(z, t, torch.full_like(y, model.config.num_classes))
        cfg = guided_dit_output(model, z, t, y, 4.0, model.config.num_classes)
    return {"cond": cond, "null": null, "cfg4_first3": cfg}


def _assert_golden(model, arrays):
    for name, out in _golden_outputs(model, arrays).items():
        diff = np.abs(out.numpy() - arrays[name]).max()
        assert diff <= TOL, f"{name}: max abs diff {diff}"


def tiny_dit(num_classes=10, seed=0, learn_sigma=True) -> ClassConditionalDiT:
    """A 10-class DiT on 8x8x4 latents, with random (non-zero) adaLN and output layers."""
    torch.manual_seed(seed)
    model = ClassConditionalDiT(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                num_classes=num_classes, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def tiny_vae(seed=0) -> AutoencoderKL:
    """16x16 RGB <-> 8x8x4 latents, 44 k parameters."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16).eval()


# ----------------------------------------------------------------------------- golden values, original formats


@pytest.mark.parametrize("fmt", ["plain", "ema", "reference"])
def test_golden_through_original_checkpoints(tmp_path, golden, fmt):
    spec, arrays, state = golden
    path = tmp_path / "ckpt.pt"
    if fmt == "plain":
        torch.save(state, path)
    elif fmt == "ema":
        torch.save({"ema": state}, path)
    else:  # the reference unlearning code: DataParallel keys and a Namespace, loaded weights_only
        torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                    "args": argparse.Namespace(model="custom", num_classes=10, image_size=64)}, path)
    model = load_original_dit(path, num_heads=spec["config"]["num_heads"])
    cfg = spec["config"]
    assert (model.config.sample_size, model.config.hidden_size, model.config.depth, model.config.num_classes,
            model.config.learn_sigma) == (cfg["input_size"], cfg["hidden_size"], cfg["depth"], cfg["num_classes"],
                                          cfg["learn_sigma"])
    assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == spec["n_params"]
    _assert_golden(model, arrays)


@pytest.mark.gpu
def test_golden_on_cuda_in_float32(tmp_path, golden, monkeypatch):
    """On a GPU in float32 (TF32 off) the model gives the golden outputs, as on the CPU: eval and sample run there."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    spec, arrays, state = golden
    torch.save(state, tmp_path / "ckpt.pt")
    model = load_original_dit(tmp_path / "ckpt.pt", num_heads=spec["config"]["num_heads"]).cuda().eval()
    z, t, y = (torch.from_numpy(arrays[k]).cuda() for k in ("z", "t", "y"))
    with torch.no_grad():
        outputs = {"cond": model(z, t, y), "null": model(z, t, torch.full_like(y, model.config.num_classes))}
    for name, out in outputs.items():
        assert out.dtype == torch.float32
        diff = np.abs(out.cpu().numpy() - arrays[name]).max()
        assert diff <= 10 * TOL, f"{name}: max abs diff {diff}"  # GPU kernels sum in another order


def test_size_from_reference_args(tmp_path, golden, monkeypatch):
    """With no size or head count given, the reference checkpoint's `args.model` names the size."""
    _, arrays, state = golden
    monkeypatch.setitem(DIT_SIZES, "DiT-T/2", dict(depth=2, hidden_size=64, num_heads=2, patch_size=2))
    path = tmp_path / "0000500.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace(model="DiT-T/2")},
               path)
    _assert_golden(load_original_dit(path), arrays)


def test_pos_embed_is_the_original_table_and_a_buffer(golden):
    _, arrays, _ = golden
    model = ClassConditionalDiT(sample_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, num_classes=10)
    assert np.abs(model.pos_embed.numpy() - arrays["pos_embed"]).max() < 1e-7
    assert "pos_embed" in model.state_dict() and "pos_embed" not in dict(model.named_parameters())


def test_head_count_and_size_errors(golden):
    _, _, state = golden
    with pytest.raises(UserError, match="head count"):
        dit_from_original(state)
    with pytest.raises(UserError, match="not a DiT-S/2"):
        dit_from_original(state, size="DiT-S/2")
    with pytest.raises(UserError, match="missing"):
        dit_from_original({k: v for k, v in state.items() if k != "final_layer.linear.bias"}, num_heads=2)


def test_original_round_trip(tmp_path):
    model = tiny_dit()
    save_original_dit(model, tmp_path / "dit.pt")
    back = load_original_dit(tmp_path / "dit.pt", num_heads=2)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_size_table_and_parameter_counts():
    """DiT-XL/2: 674.8 M trainable parameters here, 749.8 M in stock diffusers (27 embedder copies); on the
    meta device, so nothing is allocated."""
    assert dit_num_params(**DIT_SIZES["DiT-XL/2"]) == 674_834_720
    with torch.device("meta"):
        xl = ClassConditionalDiT.from_size("DiT-XL/2")
        stock = DiTTransformer2DModel(**diffusers_config(xl))
        small = ClassConditionalDiT.from_size("DiT-S/2")
    assert sum(p.numel() for p in xl.parameters()) == 674_834_720
    assert sum(p.numel() for p in stock.parameters()) == 749_826_464
    # DiT-S/2: 33.0 M with pos_embed, as the paper's table
    assert sum(p.numel() for p in small.parameters()) == dit_num_params(**DIT_SIZES["DiT-S/2"]) == 32_865_056
    cfg = dit_config_from_state(small.state_dict(), size="DiT-S/2")
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["sample_size"]) == (12, 384, 6, 32)


# ----------------------------------------------------------------------------- diffusers


def _stock_with_original_frequencies(stock):
    for block in stock.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return stock


def test_stock_diffusers_export_matches_up_to_its_frequencies(golden):
    """The exported stock model equals ours exactly once its timestep frequencies are the original's; with
    its own (`downscale_freq_shift=1`) it differs, by a measured amount."""
    spec, arrays, state = golden
    model = dit_from_original(state, num_heads=2).eval()
    stock = dit_to_diffusers(model)
    z, t, y = (torch.from_numpy(arrays[k]) for k in ("z", "t", "y"))
    with torch.no_grad():
        ours = model(z, t, y)
        stock_out = stock(z, t, y).sample
        shifted = (stock_out - ours).abs().max().item()
        fixed = (_stock_with_original_frequencies(stock)(z, t, y).sample - ours).abs().max().item()
    assert fixed == 0.0
    assert 0.01 < shifted < 0.1  # measured 0.037 on these golden weights (outputs of size ~0.2)
    emb = timestep_embedding(torch.arange(1000), 256)
    stock_emb = get_timestep_embedding(torch.arange(1000), 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert emb[0].equal(stock_emb[0]) and 1.9 < (emb - stock_emb).abs().max() < 2.0  # measured 1.98 at t≈999


def test_diffusers_folder_round_trip(tmp_path):
    """ours -> DiTPipeline folder (stock classes) -> ours: the embedder copies are re-tied, outputs equal."""
    model, vae = tiny_dit(), tiny_vae()
    export_diffusers_pipeline(model, vae, tmp_path / "dit")
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    back, vae_back, sched = load_diffusers_dit_folder(tmp_path / "dit")
    assert sched["beta_schedule"] == "linear" and not sched["clip_sample"]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())
    assert isinstance(vae_back, AutoencoderKL)


def test_untied_diffusers_embedders_are_refused():
    model = tiny_dit()
    state = dit_to_diffusers_state(model)
    state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1e-3
    with pytest.raises(UserError, match="differ"):
        dit_from_diffusers_state(state, diffusers_config(model))


def test_our_pipeline_folder_round_trip(tmp_path):
    pipe = ClassConditionalDiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=dit_training_scheduler())
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusion_unlearn.models.dit_transformer", "ClassConditionalDiT"]
    back = ClassConditionalDiTPipeline.from_pretrained(tmp_path / "p")
    a = pipe.sample_latents([1, 10 - 1], num_inference_steps=5, sampler="ddim", progress=False)
    b = back.sample_latents([1, 10 - 1], num_inference_steps=5, sampler="ddim", progress=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the respaced sampler


def test_respaced_timesteps_by_hand():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[:6] == [0, 4, 8, 12, 16, 20] and steps[-1] == 999
    assert steps[42] == 169 and steps[83] == 333 and steps[124] == 497  # 42·999/249 = 168.51, 83·999/249 = 333
    assert steps == [round(i * 999 / 249) for i in range(250)]
    linspace = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    linspace.set_timesteps(250)
    assert linspace.timesteps.flip(0).tolist() == steps  # diffusers' "linspace", not its default "leading"
    assert space_timesteps(1000, "10,20") == sorted(set(
        [round(i * 499 / 9) for i in range(10)] + [500 + round(i * 499 / 19) for i in range(20)]))


def test_one_learned_variance_step_by_hand():
    """p_sample at respaced index 1 (original step 4), against numpy float64 written from the formulas."""
    diffusion = SpacedDiffusion.from_scheduler_config(dit_training_scheduler().config, 250)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    a_prev, a_t = ac[0], ac[4]  # respaced ᾱ at indices 0 and 1
    beta = 1 - a_t / a_prev
    post_var = beta * (1 - a_prev) / (1 - a_t)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    v = torch.rand(2, 4, 3, 3, generator=g) * 2 - 1
    t = torch.tensor([1, 1])
    got = diffusion.p_sample(torch.cat([eps, v], 1), x, t, noise)
    xn, en, vn, nn_ = (a.double().numpy() for a in (x, eps, v, noise))
    x0 = np.sqrt(1 / a_t) * xn - np.sqrt(1 / a_t - 1) * en
    mean = beta * np.sqrt(a_prev) / (1 - a_t) * x0 + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a_t) * xn
    frac = (vn + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * np.log(post_var)
    want = mean + np.exp(0.5 * log_var) * nn_
    assert np.abs(got.double().numpy() - want).max() < 1e-5
    assert diffusion.model_timesteps(t).tolist() == [4, 4]
    # at index 0 no noise is added and the variance floor is the clipped posterior variance of index 1
    last = diffusion.p_sample(torch.cat([eps, v], 1), x, torch.tensor([0, 0]), noise)
    assert torch.allclose(last, diffusion.p_mean_variance(torch.cat([eps, v], 1), x, torch.tensor([0, 0]))[0])


def test_guidance_on_the_first_three_channels_by_hand():
    """ε̃[:3] = ε_u + s(ε_c − ε_u); ε[3] and the variance from the conditional half; null = config's K."""
    seen = []

    class Stub(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.stack([torch.full((8, 2, 2), float(label)) for label in y])  # (N, 8, 2, 2)

    out = guided_dit_output(Stub(), torch.zeros(2, 4, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2]), 1.5, 10)
    assert seen[0].tolist() == [1, 2, 10, 10]
    # channel c < 3: 10 + 1.5·(y − 10); otherwise y
    assert out[:, :3, 0, 0].tolist() == [[-3.5] * 3, [-2.0] * 3]
    assert out[:, 3:, 0, 0].tolist() == [[1.0] * 5, [2.0] * 5]


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 10)])
def test_samplers_run_guided_on_a_ten_class_dit(sampler, steps):
    """Both samplers, guided, on 10 classes (null = 10): per-index seeds make the result batch-size free,
    the model is fed the original step indices, and the images come out of the VAE in [−1, 1]."""
    model = tiny_dit()
    pipe = ClassConditionalDiTPipeline(transformer=model, vae=tiny_vae(), scheduler=dit_training_scheduler())
    fed = []
    hook = model.register_forward_pre_hook(lambda mod, args: fed.append((args[1].clone(), args[2].clone())))
    images = pipe([0, 3, 9], guidance_scale=4.0, num_inference_steps=steps, sampler=sampler, seed=1,
                  batch_size=3, progress=False)
    hook.remove()
    assert images.shape == (3, 3, 16, 16) and images.isfinite().all() and images.abs().max() <= 1
    assert [int(t[0]) for t, _ in fed] == space_timesteps(1000, str(steps))[::-1]
    assert fed[0][1].tolist() == [0, 3, 9, 10, 10, 10]
    one_by_one = pipe.sample_latents([0, 3, 9], guidance_scale=4.0, num_inference_steps=steps, sampler=sampler,
                                     seed=1, batch_size=1, progress=False)
    together = pipe.sample_latents([0, 3, 9], guidance_scale=4.0, num_inference_steps=steps, sampler=sampler,
                                   seed=1, batch_size=3, progress=False)
    assert torch.allclose(one_by_one, together, atol=1e-4)


# ----------------------------------------------------------------------------- the adapter's loss


def test_latent_backbone_loss_backward():
    model, vae = tiny_dit(), tiny_vae()
    backbone = LatentDiTBackbone(model, vae)
    assert (backbone.num_classes, backbone.null_class, backbone.sample_shape) == (10, 10, (4, 8, 8))
    assert backbone.denoiser is model and backbone.model is model and "pos_embed" not in backbone.named_parameters()
    model.train()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 3, 7, 9])
    loss = backbone.per_sample_loss(images, labels, cfg_dropout=0.1)
    assert loss.shape == (4,) and loss.isfinite().all()
    sfron = SFRon()
    (sfron.forget_loss(backbone, images, labels) + sfron.retain_loss(backbone, images, labels)).backward()
    grads = [p.grad for p in backbone.named_parameters().values()]
    assert all(g is not None and g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    guided = backbone.per_sample_loss(images, labels, guidance_w=2.0)
    assert guided.shape == (4,) and guided.isfinite().all()
    with torch.no_grad():  # precomputed posterior moments (B, 2C, h, w) instead of images
        moments = vae.encode(images).latent_dist.parameters
    assert backbone.per_sample_loss(moments, labels).isfinite().all()


class _Output(torch.nn.Module):
    """A 'model' whose output is a parameter: lets a test look at what the loss trains."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t, y):
        return self.out


def test_vb_trains_only_the_variance_and_vanishes_at_the_true_posterior():
    model = tiny_dit()
    backbone = LatentDiTBackbone(model, tiny_vae())
    z0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    z_t = backbone.schedule.q_sample(z0, t, noise)
    # ε̂ = ε exactly and v = −1 (variance = the clipped posterior variance): the KL term is 0
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)
    assert backbone.schedule.vb_terms(z0, z_t, t, exact).abs().max() < 1e-4
    stub = _Output(torch.cat([noise + 0.1, torch.zeros_like(noise)], 1))
    backbone.model = stub
    moments = torch.cat([z0, torch.full_like(z0, -30.0)], 1)  # a (near-)deterministic posterior at z0
    loss = backbone.per_sample_loss(moments, torch.tensor([1, 2]), t=t, noise=noise)  # (2,)
    assert (loss > 0.01).all()  # mse = 0.1² plus a positive vb
    loss.sum().backward()
    eps_grad, var_grad = stub.out.grad[:, :4], stub.out.grad[:, 4:]
    # the ε channels get the mse gradient 2(ε̂ − ε)/(C·h·w) and nothing from vb
    assert torch.allclose(eps_grad, torch.full_like(eps_grad, 0.2 / 256), rtol=1e-4)
    assert var_grad.abs().sum() > 0


def test_gradient_checkpointing_and_scalar_timesteps():
    model = tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    model(x, t, y).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model.train()
    model(x, t, y).square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
    with torch.no_grad():
        assert torch.equal(model(x, 5, y), model(x, torch.tensor([5, 5]), y, return_dict=True).sample)
