"""The latent DiT path on the digits: the VAE posterior-moment cache (round trip, invalidation, flips, fresh
posterior samples), DiT pretraining (VAE trained first, scaling factor measured, resume, reuse) and `forget` on
cached latents."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from builders import killed_pretrain_resumes
from diffusion_unlearn import latents
from diffusion_unlearn.cli import main
from diffusion_unlearn.data import BatchStream, load_dataset
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.latents import LatentMoments, bounded_subset, cache_path, cache_record, cached_moments
from diffusion_unlearn.modelfolder import load_model_folder
from diffusion_unlearn.models.factory import build_dit
from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone
from diffusion_unlearn.vae import build_vae, measure_scaling_factor

TINY_PRETRAIN = ["--preset", "digits-dit-pretrain", "--model-preset", "tiny", "--vae-preset", "tiny",
                 "--vae-iterations", "2", "--iterations", "6", "--checkpoint-every", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("tiny", channels=1, image_size=8).eval()


@pytest.fixture(scope="module")
def dit_base(tmp_path_factory):
    """A tiny digits DiT base model trained through the CLI, and its cache dir."""
    root = tmp_path_factory.mktemp("dit-base")
    out, cache = root / "base", root / "cache"
    assert main(["pretrain", *TINY_PRETRAIN, "--out", str(out), "--cache-dir", str(cache)]) == 0
    return out, cache


# ----------------------------------------------------------------------------- the moment cache


def test_moments_round_trip(tmp_path, digits, vae, monkeypatch):
    images = digits.subset(torch.arange(20))
    moments = cached_moments(vae, images, hflip=False, cache_dir=tmp_path)
    assert moments.moments.shape == (20, 1, 8, 4, 4)  # (N, F, 2C, h, w): 4×4×4 latents, no mirror images
    x, y = images.get_batch(torch.arange(20))
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.parameters  # (20, 8, 4, 4)
    torch.testing.assert_close(moments.moments[:, 0], expected)
    assert torch.equal(moments.targets, y)
    (file,) = tmp_path.iterdir()
    assert file.name.startswith("digits-train-n20-noflip-")

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again although the cache file exists")

    monkeypatch.setattr(latents, "encode_moments", refuse)
    again = cached_moments(vae, images, hflip=False, cache_dir=tmp_path)
    assert torch.equal(again.moments, moments.moments)


def test_cache_name_changes_with_every_input(digits, vae):
    def name(dataset, model, hflip=False):
        return cache_path("c", cache_record(dataset, model, hflip)).name

    images = digits.subset(torch.arange(20))
    other_vae = copy.deepcopy(vae)
    with torch.no_grad():
        next(other_vae.parameters())[0].add_(1e-3)
    relabelled = copy.copy(images)
    relabelled.targets = (images.targets + 1) % 10
    reference = name(images, vae)
    assert name(digits.subset(torch.arange(20)), copy.deepcopy(vae)) == reference  # same inputs, same file
    variants = [name(images, vae, hflip=True), name(digits.subset(torch.arange(1, 21)), vae),
                name(load_dataset("digits", split="test").subset(torch.arange(20)), vae), name(relabelled, vae),
                name(images, other_vae)]
    assert len({reference, *variants}) == 6


def test_flips_cache_the_mirror_images_encodings(tmp_path, digits, vae):
    images = digits.subset(torch.arange(6))
    moments = cached_moments(vae, images, hflip=True, cache_dir=tmp_path)
    assert moments.moments.shape == (6, 2, 8, 4, 4) and "-flip-" in next(tmp_path.iterdir()).name
    x, _ = images.get_batch(torch.arange(6))
    with torch.no_grad():
        torch.testing.assert_close(moments.moments[:, 1], vae.encode(x.flip(-1)).latent_dist.parameters)
    flip = torch.tensor([True, False, True])
    batch, _ = moments.get_batch(torch.tensor([0, 1, 2]), flip)
    assert torch.equal(batch, moments.moments[[0, 1, 2], [1, 0, 1]])
    # BatchStream draws the flip: both encodings of image 0 come out of a stream over it alone
    first = LatentMoments(moments.moments[:1], moments.targets[:1], images.class_names, "digits", "train")
    drawn = {BatchStream(first, 1, seed=s, hflip=True).next()[0][0, 0, 0, 0].item() for s in range(8)}
    assert drawn == {moments.moments[0, 0, 0, 0, 0].item(), moments.moments[0, 1, 0, 0, 0].item()}
    unflipped = LatentMoments(moments.moments[:, :1], moments.targets, images.class_names, "digits", "train")
    with pytest.raises(UserError, match="no mirror images"):
        unflipped.get_batch(torch.tensor([0]), torch.tensor([True]))


def test_each_use_samples_the_posterior_afresh(digits, vae):
    backbone = LatentDiTBackbone(build_dit("tiny", latent_channels=4, latent_size=4, num_classes=10), vae)
    x, _ = digits.get_batch(torch.arange(4))
    with torch.no_grad():
        moments = vae.encode(x).latent_dist.parameters  # (4, 8, 4, 4)
    assert not torch.equal(backbone.encode(moments), backbone.encode(moments))
    certain = torch.cat([moments[:, :4], torch.full_like(moments[:, 4:], -30.0)], dim=1)  # std ≈ 3e-7
    torch.testing.assert_close(backbone.encode(certain), moments[:, :4] * vae.config.scaling_factor)


def test_bounded_retain_subset(digits):
    subset = bounded_subset(digits, 100)
    assert len(subset) == 100 and torch.equal(subset.targets, bounded_subset(digits, 100).targets)
    assert 5 <= len(set(subset.targets.tolist())) and bounded_subset(digits, 5000) is digits


# ----------------------------------------------------------------------------- DiT pretraining


def test_dit_pretrain_writes_a_dit_folder_with_its_vae(dit_base, digits):
    out, cache = dit_base
    loaded = load_model_folder(out)
    assert loaded.meta.backbone == "dit" and loaded.sample_shape == (1, 8, 8)
    assert loaded.denoiser.config.in_channels == 4 and loaded.denoiser.config.sample_size == 4
    factor = loaded.vae.config.scaling_factor
    assert factor != 0.18215 and loaded.meta.history[0]["vae_scaling_factor"] == factor
    assert measure_scaling_factor(copy.deepcopy(loaded.vae), digits, seed=0) == pytest.approx(factor, rel=1e-6)
    (file,) = (cache / "latents").iterdir()  # the training set's moments, never flipped for digits
    assert "-noflip-" in file.name and load_file(file)["moments"].shape == (len(digits), 1, 8, 4, 4)
    assert not (out / "training_state.pt").exists()


def test_finished_dit_pretrain_is_reused(dit_base):
    out, cache = dit_base
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["pretrain", *TINY_PRETRAIN, "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert weights.stat().st_mtime_ns == before


def test_dit_pretrain_resumes_bitwise_after_a_kill(dit_base, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    args = ["pretrain", *TINY_PRETRAIN, "--out", str(out), "--cache-dir", str(dit_base[1])]
    killed_pretrain_resumes(monkeypatch, args, kill_after=3)  # the last checkpoint is at 2; the VAE is kept
    for part in ("transformer", "vae"):
        a = load_file(dit_base[0] / part / "diffusion_pytorch_model.safetensors")
        b = load_file(out / part / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_retrain_baseline_shares_the_base_models_vae(dit_base, tmp_path):
    out = tmp_path / "retrain"
    assert main(["pretrain", *TINY_PRETRAIN, "--iterations", "2", "--exclude-class", "4", "--vae", str(dit_base[0]),
                 "--out", str(out), "--cache-dir", str(dit_base[1])]) == 0
    a = load_file(dit_base[0] / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and load_model_folder(out).meta.excluded_classes == [4]


def test_unknown_dit_preset_fails_before_the_vae_trains(tmp_path, capsys):
    assert main(["pretrain", "--backbone", "dit", "--model-preset", "huge", "--out", str(tmp_path / "m")]) == 2
    assert "unknown DiT preset 'huge'" in capsys.readouterr().err and not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- forget on cached latents


def test_forget_on_cached_latents(dit_base, tmp_path, digits):
    base, cache = dit_base
    out = tmp_path / "forget"
    assert main(["forget", "--preset", "digits-dit-sfron", "--model", str(base), "--out", str(out),
                 "--cache-dir", str(cache), "--latent-cache-retain", "50", "--iterations", "2", "--batch-size", "8",
                 "--fisher-batch-size", "16", "--fisher-max-batches", "1", "--grid-per-class", "1",
                 "--sampler", "ddim", "--steps", "2", "--device", "cpu"]) == 0
    assert load_model_folder(out / "model").meta.forgotten_classes == [0]
    names = sorted(p.name for p in (cache / "latents").iterdir())
    forget_count = int((digits.targets == 0).sum())
    assert any(n.startswith(f"digits-train-n{forget_count}-noflip-") for n in names)
    assert any(n.startswith("digits-train-n50-noflip-") for n in names)  # the bounded retain subset


def test_latent_cache_refusals(dit_base, tiny_model, tmp_path, capsys):
    common = ["--latent-cache", "--iterations", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    assert main(["forget", "--model", str(tiny_model), "--out", str(tmp_path / "a"), *common]) == 2
    assert "needs a latent (DiT) model" in capsys.readouterr().err
    assert main(["forget", "--model", str(dit_base[0]), "--method", "sa", "--out", str(tmp_path / "b"), *common]) == 2
    assert "does not apply to sa" in capsys.readouterr().err
    assert main(["forget", "--model", str(dit_base[0]), "--latent-cache-retain", "0", "--out", str(tmp_path / "d"),
                 *common]) == 2
    assert "latent_cache_retain: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
