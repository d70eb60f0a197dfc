"""Every command on a DiT model folder: forget (every method, dual and shared), mask, sample, eval, convert."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_dit import tiny_dit, tiny_vae  # tests/ is on sys.path (pytest's rootdir-relative import)

from diffusion_unlearn.cli import main
from diffusion_unlearn.methods import METHODS
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone

K = 10
FAST_SAMPLER = ["--sampler", "ddim", "--steps", "2", "--grid-per-class", "1"]
TINY_FORGET = ["--iterations", "2", "--batch-size", "2", "--fisher-batch-size", "4", "--fisher-max-batches", "1",
               "--checkpoint-every", "1", "--device", "cpu", *FAST_SAMPLER]
TINY_SA = ["--sa-samples-per-class", "1", "--sa-fisher-timesteps", "2", "--sa-fisher-chunk", "2"]  # SA's own arguments




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An imagefolder of 10 classes × 3 random 16 px RGB images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(K):
        (root / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "model"
    save_model_folder(path, tiny_dit(K), ModelMeta(class_names=[f"c{c}" for c in range(K)], weights="raw"),
                      vae=tiny_vae())
    return path


def _data_args(data) -> list[str]:
    return ["--dataset", "imagefolder", "--data-root", str(data)]


def test_model_folder_round_trip(dit_folder):
    loaded = load_model_folder(dit_folder)
    meta = json.loads((dit_folder / "diffusion_unlearn.json").read_text())
    assert meta["backbone"] == "dit" and meta["channels"] == 3 and meta["image_size"] == 16
    assert loaded.sample_shape == (3, 16, 16)  # image space: 8 px latents × 2 (two VAE levels)
    backbone = loaded.backbone()
    assert isinstance(backbone, LatentDiTBackbone) and backbone.denoiser is loaded.denoiser
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert set(backbone.named_parameters()) == {n for n, _ in loaded.denoiser.named_parameters()}
    ref = tiny_dit(K)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.denoiser.state_dict().items())


def test_dataset_shape_checked_in_image_space(dit_folder, tmp_path, capsys):
    code = main(["forget", "--model", str(dit_folder), "--dataset", "digits", "--out", str(tmp_path / "f"),
                 *TINY_FORGET])
    assert code == 2 and "3-channel 16px" in capsys.readouterr().err


@pytest.mark.parametrize("optim", ["dual", "shared"])
def test_forget_sfron(dit_folder, data, tmp_path, optim):
    out = tmp_path / "forget"
    assert main(["forget", "--model", str(dit_folder), *_data_args(data), "--forget-class", "3", "--method", "sfron",
                 "--optim", optim, "--out", str(out), *TINY_FORGET, "--grid-classes", "2-4"]) == 0
    loaded = load_model_folder(out / "model")
    assert loaded.meta.backbone == "dit" and loaded.meta.forgotten_classes == [3]
    before = load_model_folder(dit_folder).denoiser.state_dict()
    after = loaded.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(before["pos_embed"], after["pos_embed"])  # a buffer: never trained
    vae_before, vae_after = load_model_folder(dit_folder).vae.state_dict(), loaded.vae.state_dict()
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)  # frozen
    from safetensors.torch import load_file

    assert set(load_file(out / "mask.safetensors")) == set(load_file(out / "ema.safetensors")) == {
        n for n, _ in loaded.denoiser.named_parameters()}
    with Image.open(out / "grid-after.png") as a, Image.open(out / "grid-before.png") as b:
        assert a.size == b.size
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("optim", ["dual", "shared"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"sfron"}))
def test_every_method_runs_on_dit(dit_folder, data, tmp_path, method, optim):
    out = tmp_path / "forget"
    assert main(["forget", "--model", str(dit_folder), *_data_args(data), "--forget-class", "1", "--method", method,
                 "--optim", optim, "--out", str(out), *TINY_FORGET, *(TINY_SA if method == "sa" else [])]) == 0
    assert load_model_folder(out / "model").meta.backbone == "dit"


def test_forget_switches_bf16_and_checkpointing(dit_folder, data, tmp_path):
    from accelerate.state import AcceleratorState

    out = tmp_path / "forget"
    AcceleratorState._reset_state()  # accelerate fixes the precision once per process; one CLI run is one process
    try:
        assert main(["forget", "--model", str(dit_folder), *_data_args(data), "--out", str(out), *TINY_FORGET,
                     "--iterations", "1", "--gradient-checkpointing", "--mixed-precision", "bf16"]) == 0
    finally:
        AcceleratorState._reset_state()
    assert load_model_folder(out / "model").denoiser.dtype == torch.float32  # autocast, not a cast of the weights


def test_mask_command(dit_folder, data, tmp_path):
    out = tmp_path / "mask.safetensors"
    assert main(["mask", "--model", str(dit_folder), *_data_args(data), "--forget-class", "2", "--out", str(out),
                 "--fisher-batch-size", "4", "--fisher-max-batches", "1", "--device", "cpu"]) == 0
    from diffusion_unlearn.saliency import load_mask

    assert set(load_mask(out, load_model_folder(dit_folder).denoiser)) == {
        n for n, _ in load_model_folder(dit_folder).denoiser.named_parameters()}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_grid_and_folder(dit_folder, tmp_path, sampler):
    grid, folder = tmp_path / "grid.png", tmp_path / "pngs"
    assert main(["sample", "--model", str(dit_folder), "--classes", "0,4", "--per-class", "2", "--grid", str(grid),
                 "--out-dir", str(folder), "--sampler", sampler, "--steps", "3", "--device", "cpu"]) == 0
    assert grid.is_file() and len(list(folder.glob("*.png"))) == 4
    with Image.open(next(folder.glob("*.png"))) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_eval_with_classifier_features(dit_folder, data, tmp_path):
    clf = tmp_path / "clf"
    assert main(["train-classifier", *_data_args(data), "--arch", "resnet18", "--epochs", "1", "--batch-size", "8",
                 "--out", str(clf), "--device", "cpu"]) == 0
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(dit_folder), *_data_args(data), "--forget-class", "2", "--classifier",
                 str(clf), "--fa-samples", "3", "--retain-samples-per-class", "1", "--fid-extractor", "classifier",
                 "--sampler", "ddim", "--steps", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    m = json.loads(out.read_text())
    assert m["fa_samples"] == 3 and m["retain_samples"] == 9 and 0 <= m["fa"] <= 1 and m["fid"] >= 0


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_convert_round_trips(dit_folder, tmp_path, capsys):
    base = load_model_folder(dit_folder)
    names = ",".join(base.meta.class_names)
    # ours → original .pt → ours (the VAE from our folder)
    pt = tmp_path / "dit.pt"
    assert main(["convert", str(dit_folder), "--to", "dit-original", "--out", str(pt)]) == 0
    back = tmp_path / "from-original"
    assert main(["convert", "--from", "dit-original", str(pt), "--vae", str(dit_folder), "--num-heads", "2",
                 "--class-names", names, "--out", str(back)]) == 0
    loaded = load_model_folder(back)
    assert loaded.meta.backbone == "dit" and _same_weights(loaded.denoiser, base.denoiser)
    assert _same_weights(loaded.vae, base.vae)
    # the reference unlearning format {"model": {"module.*"}, "args"} through the same --from
    ref = tmp_path / "0000500.pt"
    torch.save({"model": {f"module.{k}": v for k, v in base.denoiser.state_dict().items()}}, ref)
    assert main(["convert", "--from", "dit-original", str(ref), "--vae", str(dit_folder), "--num-heads", "2",
                 "--class-names", "index", "--out", str(tmp_path / "from-ref")]) == 0
    assert load_model_folder(tmp_path / "from-ref").meta.class_names == [str(i) for i in range(K)]
    # ours → stock diffusers DiTPipeline folder → ours
    stock = tmp_path / "stock"
    assert main(["convert", str(dit_folder), "--to", "diffusers-dit", "--out", str(stock)]) == 0
    assert (stock / "transformer" / "config.json").is_file()
    again = tmp_path / "from-diffusers"
    assert main(["convert", "--from", "diffusers-dit", str(stock), "--class-names", names, "--out", str(again)]) == 0
    assert _same_weights(load_model_folder(again).denoiser, base.denoiser)
    # one-line errors
    capsys.readouterr()
    assert main(["convert", "--from", "dit-original", str(pt), "--out", str(tmp_path / "x")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["convert", "--from", "dit-original", str(pt), "--vae", str(dit_folder), "--num-heads", "2",
                 "--class-names", "a,b", "--out", str(tmp_path / "y")]) == 2
    assert "--class-names index" in capsys.readouterr().err


def test_export_refuses_a_ddpm_folder(tmp_path, capsys):
    from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet

    path = tmp_path / "ddpm"
    save_model_folder(path, ClassConditionalUNet.from_preset("tiny"),
                      ModelMeta(class_names=[str(i) for i in range(10)]))
    assert main(["convert", str(path), "--to", "dit-original", "--out", str(tmp_path / "x.pt")]) == 2
    assert "exports DiT model folders" in capsys.readouterr().err


def test_preset_loads():
    from diffusion_unlearn.config import ForgetConfig, build_config, preset_path, yaml_values

    cfg = build_config(ForgetConfig, yaml_values(ForgetConfig, preset_path("dit-xl2-imagenet-sfron-dual")))
    assert (cfg.batch_size, cfg.iterations, cfg.forget_optimizer.lr, cfg.retain_optimizer.lr,
            cfg.method_args["adaptive_lambda"], cfg.clip_retain) == (1, 500, 5e-5, 5e-5, 0.0, False)
    assert cfg.method_args["cfg_dropout_in_forget_loss"] and cfg.sampler.sampler == "ddpm"
    assert cfg.grid_classes.startswith("207")


def test_forget_with_a_reference_dit_mask(dit_folder, data, tmp_path):
    """The reference's `fisher_<γ>.pt`: `module.*` bool tensors and `module.pos_embed` the integer 0."""
    unet = load_model_folder(dit_folder).denoiser
    mask = {f"module.{n}": torch.rand(p.shape) < 0.5 for n, p in unet.named_parameters()}
    path = tmp_path / "fisher_3.0.pt"
    torch.save({**mask, "module.pos_embed": 0}, path)
    out = tmp_path / "forget"
    assert main(["forget", "--model", str(dit_folder), *_data_args(data), "--mask", str(path), "--out", str(out),
                 *TINY_FORGET, "--iterations", "1"]) == 0
    from safetensors.torch import load_file

    saved = load_file(out / "mask.safetensors")
    assert all(torch.equal(saved[n], mask[f"module.{n}"]) for n, _ in unet.named_parameters())
