"""ImageNet evaluation on the DiT backbone: importing a torchvision/timm classifier for FA (reference §5.1), ADM's
center crop (§4.2), the FID reference pick (§5.2), per-backbone sampler defaults, and `eval` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import save_file
from test_dit import tiny_dit, tiny_vae  # tests/ is on sys.path (pytest's rootdir-relative import)
from torchvision.transforms.v2 import functional as TF

from diffusion_unlearn.cli import main
from diffusion_unlearn.config import EvalConfig, SampleConfig, SamplerConfig, build_config
from diffusion_unlearn.data import ImageDataset, adm_center_crop, load_dataset
from diffusion_unlearn.eval.classifier import check_classifier_classes, load_classifier
from diffusion_unlearn.eval.fid import reference_cache_name, reference_indices, reference_selection
from diffusion_unlearn.eval.import_classifier import ImportClassifierConfig, import_classifier
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.pipelines.sampling import generate
from diffusion_unlearn.sample import sample
from diffusion_unlearn.sampler_defaults import resolve_sampler

K = 10
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision ResNet-18 (K classes, random weights and BatchNorm statistics) saved as a plain state dict,
    the layout of torchvision's `resnet34-b627a593.pth`; and the network itself."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=K).eval()
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("torchvision") / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _import(path, out, **kw):
    return import_classifier(ImportClassifierConfig(path=str(path), out=str(out), **{"arch": "resnet18", **kw}))


# ----------------------------------------------------------------------------- the FA classifier


def test_imported_torchvision_classifier_equals_torchvision(torchvision_file, tmp_path):
    path, tv = torchvision_file
    _import(path, tmp_path / "clf", image_size=64, resize=56)
    clf = load_classifier(tmp_path / "clf").eval()
    assert clf.class_names == [str(i) for i in range(K)]
    assert clf.meta["normalisation"] == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} and clf.meta["resize"] == 56
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (3, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        prepared = clf.prepare(x)  # (3, 3, 56, 56)
        assert torch.allclose(clf.net(prepared), tv(prepared), rtol=0, atol=1e-5)
        # the reference's transform: Resize((56, 56)) (bilinear, antialiased), ToTensor, Normalize(ImageNet)
        want = tv(TF.normalize(TF.resize((x + 1) / 2, [56, 56], antialias=True), IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(clf.logits(x), want, rtol=0, atol=1e-4)


def test_timm_safetensors_and_old_torchvision_files_import(torchvision_file, tmp_path):
    path, tv = torchvision_file
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 files
    torch.save({"state_dict": {f"module.{k}": v for k, v in old.items()}}, tmp_path / "old.pth")
    assert _import(tmp_path / "old.pth", tmp_path / "a")["num_classes"] == K
    timm_net = timm.create_model("resnet18", num_classes=3)
    save_file(timm_net.state_dict(), tmp_path / "timm.safetensors")
    assert _import(tmp_path / "timm.safetensors", tmp_path / "b", class_names="x,y,z")["num_classes"] == 3
    assert load_classifier(tmp_path / "b").class_names == ["x", "y", "z"]


def test_bad_classifier_files_are_user_errors(torchvision_file, tmp_path):
    path, tv = torchvision_file
    with pytest.raises(UserError, match="not found"):
        _import(tmp_path / "missing.pth", tmp_path / "c")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="no state dict"):
        _import(tmp_path / "list.pth", tmp_path / "c")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "conv.pth")
    with pytest.raises(UserError, match="no fc.weight"):
        _import(tmp_path / "conv.pth", tmp_path / "c")
    with pytest.raises(UserError, match="does not fit --arch resnet34: 80 missing keys, 0 unexpected"):
        _import(path, tmp_path / "c", arch="resnet34")
    with pytest.raises(UserError, match="3 names but .* has 10 classes"):
        _import(path, tmp_path / "c", class_names="a,b,c")
    with pytest.raises(UserError, match="not digits-cnn"):
        _import(path, tmp_path / "c", arch="digits-cnn")
    assert not (tmp_path / "c").exists()
    _import(path, tmp_path / "clf")
    clf = load_classifier(tmp_path / "clf")
    with pytest.raises(UserError, match="has 10 classes, the model 1000"):
        check_classifier_classes(clf, [str(i) for i in range(1000)])
    with pytest.raises(UserError, match="names class 0 '0', the model 'n01440764'"):
        check_classifier_classes(clf, ["n01440764", *map(str, range(1, K))])


# ----------------------------------------------------------------------------- ADM's center crop


def test_adm_center_crop_by_hand(tmp_path):
    # 20x8 of 4x4 blocks v(r, c) = 10 + 40r + 8c with ±2 in a checkerboard: every 2x2 BOX mean is exactly v.
    yy, xx = np.mgrid[0:8, 0:20]
    image = 10 + 40 * (yy // 4) + 8 * (xx // 4) + np.where((yy + xx) % 2 == 0, 2, -2)
    # size 2: 20x8 → 10x4 (4 ≥ 2·2) → 5x2 (stop: 2 < 4), bicubic to 5x2 (a no-op), crop x from (5−2)//2 = 1
    got = np.array(adm_center_crop(Image.fromarray(image.astype(np.uint8)), 2))
    assert got.tolist() == [[18, 26], [58, 66]]  # v(0, 1), v(0, 2); v(1, 1), v(1, 2)
    # short side already `size`: no resize, crop x from (6−4)//2 = 1, y from 0
    small = np.arange(24, dtype=np.uint8).reshape(4, 6)  # (H, W)
    assert np.array(adm_center_crop(Image.fromarray(small), 4)).tolist() == small[:, 1:5].tolist()
    # no halving (6 < 2·4): BICUBIC to (round(12·4/6), 4) = (8, 4), crop x from (8−4)//2 = 2
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 12), dtype=np.uint8))
    want = np.array(wide.resize((8, 4), Image.BICUBIC))[:, 2:6]
    assert np.array_equal(np.array(adm_center_crop(wide, 4)), want)
    # through an image folder: RGB, cropped to the asked size, its transform named
    (tmp_path / "train" / "n0").mkdir(parents=True)
    rgb = Image.fromarray(np.dstack([image, image // 2, 255 - image]).astype(np.uint8))
    rgb.save(tmp_path / "train" / "n0" / "a.png")
    ds = load_dataset("imagefolder", str(tmp_path), "train", image_size=2)
    x, _ = ds[0]  # (3, 2, 2) in [-1, 1]
    assert "admcrop2" in ds.transform_id
    assert torch.equal(x, torch.from_numpy(np.array(adm_center_crop(rgb, 2))).permute(2, 0, 1).float() / 255 * 2 - 1)


# ----------------------------------------------------------------------------- the FID reference set


def test_fid_reference_is_a_seeded_uniform_pick_across_classes():
    targets = torch.arange(10).repeat_interleave(30)  # (300,) sorted by class, as an image folder
    ds = ImageDataset(name="folder", split="train", root=None, class_names=list("abcdefghij"), channels=3,
                      image_size=2, transform_id="t", targets=targets,
                      pixels=torch.zeros(300, 3, 2, 2, dtype=torch.uint8))
    keep = reference_indices(ds, 2, 50)
    assert len(keep.unique()) == 50 and torch.equal(keep, keep.sort().values)
    assert not (targets[keep] == 2).any() and len(targets[keep].unique()) == 9  # the first 50 span 2 classes
    assert torch.equal(keep, reference_indices(ds, 2, 50))
    assert len(reference_indices(ds, 2, None)) == 270
    assert reference_selection(ds, 2, 50, "standard") == "50 of 270 uniformly at random (seed 0)"
    assert reference_selection(ds, 2, 270, "standard") == "all"
    assert reference_cache_name(ds, 2, 50, "x") != reference_cache_name(ds, 2, 51, "x")


# ----------------------------------------------------------------------------- per-backbone sampler defaults


def _described(s: SamplerConfig) -> tuple:
    return s.sampler, s.steps, s.guidance_scale


def test_sampler_defaults_per_backbone_and_purpose():
    unset = SamplerConfig()
    assert _described(resolve_sampler(unset, "ddpm", "eval")) == ("ddim", 50, 3.0)
    assert _described(resolve_sampler(unset, "ddpm", "grid")) == ("ddim", 50, 3.0)
    assert _described(resolve_sampler(unset, "dit", "eval")) == ("ddpm", 250, 1.5)
    assert _described(resolve_sampler(unset, "dit", "grid")) == ("ddpm", 250, 4.0)
    assert _described(resolve_sampler(SamplerConfig(sampler="ddim"), "dit", "eval")) == ("ddim", 50, 1.5)
    assert _described(resolve_sampler(SamplerConfig(sampler="ddpm"), "ddpm", "eval")) == ("ddpm", 50, 3.0)
    explicit = build_config(EvalConfig, {"steps": 100, "guidance_scale": 2.0, "eta": 1.0}).sampler
    assert _described(resolve_sampler(explicit, "dit", "grid")) == ("ddpm", 100, 2.0)
    assert resolve_sampler(explicit, "dit", "grid").eta == 1.0
    with pytest.raises(ValueError, match="resolve_sampler"):
        generate(None, [0], 1, unset)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A tiny ImageNet-layout world: a 10-class DiT folder named by index (16 px images through a 2-level VAE),
    `train/<synset>/*.JPEG` of non-square images, and a classifier imported from a torchvision file."""
    root = tmp_path_factory.mktemp("imagenet")
    save_model_folder(root / "model", tiny_dit(K), ModelMeta(class_names=[str(c) for c in range(K)], weights="ema"),
                      vae=tiny_vae())
    rng = np.random.default_rng(0)
    for c in range(K):
        folder = root / "data" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate([(40, 24), (36, 70), (16, 16)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=K).state_dict(), root / "resnet18.pth")
    assert main(["import-classifier", str(root / "resnet18.pth"), "--arch", "resnet18", "--image-size", "16",
                 "--resize", "32", "--out", str(root / "clf")]) == 0
    return root


def test_sample_and_forget_grids_default_to_the_grid_scale_on_dit(imagenet_like, tmp_path):
    model, steps = str(imagenet_like / "model"), SamplerConfig(steps=20)
    grid = sample(SampleConfig(model=model, classes="0", per_class=1, grid=str(tmp_path / "grid.png"), sampler=steps,
                               device="cpu"))
    assert (grid["sampler"], grid["steps"], grid["guidance_scale"]) == ("ddpm", 20, 4.0)
    folder = sample(SampleConfig(model=model, classes="0", per_class=1, out_dir=str(tmp_path / "pngs"), sampler=steps,
                                 device="cpu"))
    assert (folder["sampler"], folder["steps"], folder["guidance_scale"]) == ("ddpm", 20, 1.5)
    assert json.loads((tmp_path / "pngs" / "samples.json").read_text())["guidance_scale"] == 1.5
    out = tmp_path / "forget"
    assert main(["forget", "--model", str(imagenet_like / "model"), "--dataset", "imagefolder", "--data-root",
                 str(imagenet_like / "data"), "--forget-class", "1", "--method", "ft", "--iterations", "1",
                 "--batch-size", "2", "--grid-classes", "0", "--grid-per-class", "1", "--steps", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    sampler = yaml.safe_load((out / "config.yaml").read_text())["sampler"]
    assert (sampler["sampler"], sampler["steps"], sampler["guidance_scale"]) == ("ddpm", 3, 4.0)


def test_eval_on_an_imagenet_layout_with_dit_defaults(imagenet_like, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(imagenet_like / "model"), "--dataset", "imagefolder", "--data-root",
                 str(imagenet_like / "data"), "--forget-class", "2", "--classifier", str(imagenet_like / "clf"),
                 "--fa-samples", "2", "--retain-samples-per-class", "1", "--fid-extractor", "classifier",
                 "--fid-reference-count", "12", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    m = json.loads(out.read_text())
    assert (m["sampler"], m["steps"], m["guidance_scale"], m["guidance_w"]) == ("ddpm", 250, 1.5, 0.5)
    assert m["fa_samples"] == 2 and m["retain_samples"] == 9 and 0 <= m["fa"] <= 1 and m["fid"] >= 0
    assert m["fid_reference_count"] == 12 and m["fid_reference_selection"] == "12 of 27 uniformly at random (seed 0)"
    assert m["forget_class_name"] == "2" and "resnet18" in m["fid_feature_extractor"]
    assert load_model_folder(imagenet_like / "model").sample_shape == (3, 16, 16)
