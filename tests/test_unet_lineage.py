"""The lineage conditional U-Net and its checkpoint conversion, checked against the reference's golden outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.models.convert_lineage import (
    lineage_config_to_unet_kwargs,
    read_lineage_checkpoint,
    unet_from_lineage_state_dict,
)
from diffusion_unlearn.models.unet_lineage import UNET_PRESETS, ClassConditionalUNet

GOLDEN_NAMES = ["lineage-unet-small", "lineage-unet-cifar10"]
TOL = 1e-5


# ----------------------------------------------------------------------------- helpers


def _load_golden(golden_dir, name):
    spec = json.loads((golden_dir / f"{name}.json").read_text())
    arrays = dict(np.load(golden_dir / f"{name}.npz"))
    return spec, arrays


def _fill_reference_state(spec, arrays) -> dict[str, torch.Tensor]:
    """The golden recipe: a reference-layout (unprefixed) state dict filled from `fill_order` alone."""
    fixed = set(spec.get("fixed", []))
    g = torch.Generator().manual_seed(spec["seed"])
    state = {}
    for key, shape in spec["fill_order"]:
        if key in fixed:
            state[key] = torch.from_numpy(arrays[key]).clone()
            continue
        state[key] = torch.randn(shape, generator=g) * (0.05 if len(shape) > 1 else 0.1)
    return state


def _save_lineage_ckpt(path, state, ema=None):
    """Write a checkpoint in the lineage's list format: [module.* state, optimizer state, step, (ema shadow)]."""
    obj = [{f"module.{k}": v for k, v in state.items()}, {}, 0]
    if ema is not None:
        obj.append(ema)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are small: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine
    (measured: 9 s instead of 0.16 s per tiny forward+backward under load). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden_cache():
    return {}


def _golden(golden_dir, golden_cache, name):
    if name not in golden_cache:
        spec, arrays = _load_golden(golden_dir, name)
        golden_cache[name] = (spec, arrays, _fill_reference_state(spec, arrays))
    return golden_cache[name]


def _tiny_inputs(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)  # (B, 1, 8, 8)
    t = torch.randint(0, 1000, (batch,), generator=g)  # (B,)
    c = torch.arange(batch) % 10  # (B,)
    return x, t, c


# ----------------------------------------------------------------------------- golden equality


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_outputs_through_user_path(golden_dir, golden_cache, tmp_path, name):
    spec, arrays, state = _golden(golden_dir, golden_cache, name)
    ckpt = _save_lineage_ckpt(tmp_path / "ckpt.pth", state)

    loaded = read_lineage_checkpoint(ckpt, weights="raw")
    assert set(loaded) == set(state)
    model = unet_from_lineage_state_dict(loaded, spec["config"])
    model.save_pretrained(tmp_path / "unet")
    del model
    model = ClassConditionalUNet.from_pretrained(tmp_path / "unet").eval()
    assert tuple(model.config.ch_mult) == tuple(spec["config"]["ch_mult"])

    x = torch.from_numpy(arrays["x"])  # (B, C, H, W)
    t = torch.from_numpy(arrays["t"])  # (B,)
    c = torch.from_numpy(arrays["c"])  # (B,)
    null = torch.full_like(c, spec["config"]["n_classes"])  # (B,) label K = null
    with torch.no_grad():
        cond_out = model(x, t, c)
        null_out = model(x, t, null)
    w = 2.0
    guided = (1 + w) * cond_out - w * null_out
    for got, key in [(cond_out, "cond"), (null_out, "null"), (guided, "guided_w2")]:
        ref = torch.from_numpy(arrays[key])
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"{name} {key}: max abs diff {diff:.3g} > {TOL}"


def test_golden_ema_path_takes_ema_tensors(golden_dir, golden_cache, tmp_path):
    spec, arrays, state = _golden(golden_dir, golden_cache, "lineage-unet-small")
    ema = {k: v.clone() for k, v in state.items()}  # unprefixed, like the lineage's EMAHelper shadow
    ema["conv_out.weight"] = state["conv_out.weight"] * 0.5
    ckpt = _save_lineage_ckpt(tmp_path / "ckpt.pth", state, ema=ema)

    raw = read_lineage_checkpoint(ckpt, weights="raw")
    torch.testing.assert_close(raw["conv_out.weight"], state["conv_out.weight"], rtol=0, atol=0)
    got = read_lineage_checkpoint(ckpt, weights="ema")
    assert set(got) == set(state)
    torch.testing.assert_close(got["conv_out.weight"], state["conv_out.weight"] * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(got["conv_in.weight"], state["conv_in.weight"], rtol=0, atol=0)
    model = unet_from_lineage_state_dict(got, spec["config"])
    torch.testing.assert_close(model.conv_out.weight.detach(), state["conv_out.weight"] * 0.5, rtol=0, atol=0)


def test_ema_shadow_is_filled_over_raw_weights(tmp_path):
    model = ClassConditionalUNet.from_preset("tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {"conv_out.bias": torch.full_like(state["conv_out.bias"], 3.0)}  # shadow covers a subset only
    ckpt = _save_lineage_ckpt(tmp_path / "ckpt.pth", state, ema=partial)
    got = read_lineage_checkpoint(ckpt, weights="ema")
    assert set(got) == set(state)
    assert torch.equal(got["conv_out.bias"], partial["conv_out.bias"])
    assert torch.equal(got["conv_in.weight"], state["conv_in.weight"])
    unet_from_lineage_state_dict(got, UNET_PRESETS["tiny"] | {"n_classes": 10})  # complete: loads strictly


def test_plain_state_dict_file_is_accepted(tmp_path):
    model = ClassConditionalUNet.from_preset("tiny")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "plain.pt")
    got = read_lineage_checkpoint(tmp_path / "plain.pt")
    assert set(got) == set(model.state_dict())
    with pytest.raises(UserError, match="no EMA"):
        read_lineage_checkpoint(tmp_path / "plain.pt", weights="ema")


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_key_list_and_shapes_match_golden_fill_order(golden_dir, name):
    spec, _ = _load_golden(golden_dir, name)
    with torch.device("meta"):
        model = ClassConditionalUNet(**lineage_config_to_unet_kwargs(spec["config"]))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    ref = [(k, list(s)) for k, s in spec["fill_order"]]
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == spec["n_params"]


def test_cifar10_preset_parameter_count():
    with torch.device("meta"):
        model = ClassConditionalUNet.from_preset("cifar10")
    assert sum(p.numel() for p in model.parameters()) == 38_632_323
    assert len(model.state_dict()) == 334
    assert all(p.requires_grad for p in model.parameters())


def test_config_mapping():
    cfg = {"ch": 64, "ch_mult": [1, 2], "n_classes": 7, "attn_resolutions": [8], "var_type": "fixedlarge"}
    kw = lineage_config_to_unet_kwargs(cfg)
    assert kw["num_classes"] == 7 and kw["ch"] == 64
    assert kw["ch_mult"] == (1, 2) and kw["attn_resolutions"] == (8,)
    assert "var_type" not in kw and "n_classes" not in kw
    assert kw["image_size"] == 32  # unspecified keys keep the published CIFAR-10 values


# ----------------------------------------------------------------------------- errors


def test_missing_key_is_a_user_error(tmp_path):
    state = dict(ClassConditionalUNet.from_preset("tiny").state_dict())
    del state["mid.attn_1.q.weight"]
    ckpt = _save_lineage_ckpt(tmp_path / "ckpt.pth", state)
    loaded = read_lineage_checkpoint(ckpt)
    with pytest.raises(UserError, match=r"mid\.attn_1\.q\.weight"):
        unet_from_lineage_state_dict(loaded, {**UNET_PRESETS["tiny"], "n_classes": 10})


def test_wrong_config_is_a_user_error():
    state = ClassConditionalUNet.from_preset("tiny").state_dict()
    with pytest.raises(UserError, match="shape|missing|unexpected"):
        unet_from_lineage_state_dict(state)  # default: the CIFAR-10 configuration


def test_ema_on_checkpoint_without_ema_is_a_user_error(tmp_path):
    state = ClassConditionalUNet.from_preset("tiny").state_dict()
    ckpt = _save_lineage_ckpt(tmp_path / "ckpt.pth", state)
    with pytest.raises(UserError, match="EMA"):
        read_lineage_checkpoint(ckpt, weights="ema")


def test_nonexistent_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_lineage_checkpoint(tmp_path / "nope" / "ckpt.pth")


def test_bad_weights_argument_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="raw"):
        read_lineage_checkpoint(tmp_path / "ckpt.pth", weights="best")


# ----------------------------------------------------------------------------- tiny preset behaviour


def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = ClassConditionalUNet.from_preset("tiny").train()
    x, t, c = _tiny_inputs()
    c[0] = 10  # one null label, so the null vector gets a gradient too
    out = model(x, t, c)
    assert out.shape == (8, 1, 8, 8)
    out.pow(2).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    assert model.null_classes_emb.grad.abs().sum() > 0


def test_tiny_null_label_differs_and_is_per_sample():
    torch.manual_seed(0)
    model = ClassConditionalUNet.from_preset("tiny").eval()
    x, t, c = _tiny_inputs()
    with torch.no_grad():
        cond = model(x, t, c)
        null = model(x, t, torch.full_like(c, 10))
        mixed = model(x, t, torch.where(torch.arange(8) % 2 == 0, c, torch.full_like(c, 10)))
        other = model(x, t, (c + 1) % 10)
    assert not torch.allclose(cond, null)
    assert not torch.allclose(cond, other)
    torch.testing.assert_close(mixed[0::2], cond[0::2])
    torch.testing.assert_close(mixed[1::2], null[1::2])


def test_tiny_timestep_forms_and_return_dict():
    torch.manual_seed(0)
    model = ClassConditionalUNet.from_preset("tiny").eval()
    x, _, c = _tiny_inputs()
    with torch.no_grad():
        ref = model(x, torch.full((8,), 500), c)
        torch.testing.assert_close(model(x, 500, c), ref)
        torch.testing.assert_close(model(x, torch.tensor(500), c), ref)
        torch.testing.assert_close(model(x, 500.0, c), ref)
        out = model(x, 500, c, return_dict=True)
    torch.testing.assert_close(out.sample, ref)


def test_tiny_out_of_range_label_fails():
    model = ClassConditionalUNet.from_preset("tiny").eval()
    x, t, c = _tiny_inputs()
    with pytest.raises(IndexError):
        model(x, t, torch.full_like(c, 11))


def test_tiny_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = ClassConditionalUNet.from_preset("tiny").eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    again = ClassConditionalUNet.from_pretrained(tmp_path / "m").eval()
    assert tuple(again.config.ch_mult) == (1, 2)
    x, t, c = _tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, c), model(x, t, c), rtol=0, atol=0)


def test_tiny_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = ClassConditionalUNet.from_preset("tiny").eval()  # eval: no dropout, so both passes are identical
    x, t, c = _tiny_inputs()
    model(x, t, c).pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    model(x, t, c).pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_presets_are_valid_and_from_preset_overrides():
    for name in UNET_PRESETS:
        with torch.device("meta"):
            model = ClassConditionalUNet.from_preset(name)
        assert model.config.image_size == UNET_PRESETS[name]["image_size"]
    with torch.device("meta"):
        model = ClassConditionalUNet.from_preset("tiny", num_classes=5)
    assert model.classes_emb.num_embeddings == 5
    with pytest.raises(ValueError, match="unknown"):
        ClassConditionalUNet.from_preset("huge")
    with pytest.raises(ValueError, match="divisible by 32"):
        ClassConditionalUNet(ch=48, ch_mult=(1, 2))
