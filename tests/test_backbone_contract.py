"""The contracts of the backbone and method interfaces: every registered method runs on every built-in backbone
under both optimizer setups; a method or a backbone registered from outside is dispatched without edits
elsewhere; every module imports on its own and no module-level import cycle remains."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffusion_unlearn.config import (ForgetConfig, SampleConfig, SamplerConfig, build_config,
                                      forget_registry_caches)
from diffusion_unlearn.data import ImageDataset, forget_retain_split
from diffusion_unlearn.methods import METHODS, build_method, register_method
from diffusion_unlearn.methods.base import Method
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.models.dit_transformer import ClassConditionalDiT
from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.pipelines.base import BACKBONES, SamplerDefaults, register_backbone
from diffusion_unlearn.pipelines.registry import DDPMBackbone, LatentDiTBackbone
from diffusion_unlearn.sample import sample
from diffusion_unlearn.sampler_defaults import resolve_sampler
from diffusion_unlearn.unlearn import Unlearner
from diffusion_unlearn.vae import build_vae

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_unlearn"


# ----------------------------------------------------------------------------- every method × backbone × setup


def _data(channels: int, size: int) -> ImageDataset:
    """40 random images, 4 of each of 10 classes."""
    g = torch.Generator().manual_seed(0)
    return ImageDataset(name="synthetic", split="train", root=None, class_names=[str(i) for i in range(10)],
                        channels=channels, image_size=size, transform_id="synthetic",
                        targets=torch.arange(40) % 10,
                        pixels=torch.randint(0, 256, (40, channels, size, size), generator=g, dtype=torch.uint8))


def _ddpm():
    torch.manual_seed(0)
    return DDPMBackbone(ClassConditionalUNet.from_preset("tiny")), _data(1, 8)


def _dit():
    torch.manual_seed(0)
    vae = build_vae("tiny", channels=1, image_size=8).eval().requires_grad_(False)  # 8×8 → 4×4×4 latents
    dit = ClassConditionalDiT(sample_size=4, patch_size=1, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                              num_classes=10, learn_sigma=True)
    with torch.no_grad():  # adaLN-Zero starts at zero: random weights make every path carry gradient
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return LatentDiTBackbone(dit, vae), _data(1, 8)


BUILDERS = {"ddpm": _ddpm, "dit": _dit}


def _config(method: str, optim: str, backbone) -> ForgetConfig:
    sampler = resolve_sampler(SamplerConfig(steps=2, sample_batch_size=64), backbone.name, "grid")
    sa = dict(sa_samples_per_class=1, sa_fisher_timesteps=2, sa_fisher_chunk=1, ewc_lambda=1.0) if method == "sa" else {}
    cfg = build_config(ForgetConfig, dict(method=method, optim=optim, schedule="alternate", iterations=2,
                                          forget_steps=1, retain_steps=1, batch_size=4, forget_lr=1e-2, retain_lr=1e-2,
                                          forget_class=3, **sa))
    return replace(cfg, sampler=sampler)


def _unlearner(cfg: ForgetConfig, backbone, data: ImageDataset, tmp: Path, method: Method | None = None):
    from diffusion_unlearn.saliency import GradientMask

    method = method or build_method(cfg)
    forget_set, retain_set = forget_retain_split(data, cfg.forget_class)
    retain_set = method.prepare(backbone, forget_set, retain_set, tmp)
    g = torch.Generator().manual_seed(1)
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in backbone.named_parameters().items()}
    return Unlearner(cfg, backbone, forget_set, retain_set, GradientMask(backbone.denoiser, mask),
                     Accelerator(cpu=True), method), mask


def _weights(backbone) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.named_parameters().items()}


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("optim", ["dual", "shared"])
@pytest.mark.parametrize("backbone_name", sorted(BUILDERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_contract(tmp_path, method, backbone_name, optim):
    """Two iterations: finite losses; under `dual` a forget step never moves a masked-out coordinate, under
    `shared` it does once retain steps have filled the shared moments (unless the retain step is masked too);
    the state round-trips bitwise and a restored learner continues exactly as the original."""
    backbone, data = BUILDERS[backbone_name]()
    cfg = _config(method, optim, backbone)
    learner, mask = _unlearner(cfg, backbone, data, tmp_path)
    before = {"w": _weights(backbone)}
    masked_moved = []  # per forget step: did any masked-out coordinate move?

    def after_step(k: int, phase: str) -> None:
        now = _weights(backbone)
        if phase == "forget":
            masked_moved.append(any(((now[n] != before["w"][n]) & ~mask[n]).any() for n in now))
        before["w"] = now

    records = [learner.run_iteration(after_step) for _ in range(2)]
    losses = [v for r in records for k, v in r.items() if k.endswith("_loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    forgets = learner.method.forget_loss is not None
    assert len(masked_moved) == (2 if forgets else 0)
    if optim == "dual" or learner.method.mask_retain:
        assert not any(masked_moved)
    elif forgets:
        assert masked_moved == [False, True]  # the shared moments carry the retain step into the forget step

    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # a copy: state_dict() shares the live tensors
    expected = learner.run_iteration(None)
    twin_backbone, _ = BUILDERS[backbone_name]()
    twin, _ = _unlearner(cfg, twin_backbone, data, tmp_path, learner.method)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin.load_state_dict(saved)
    assert _tensors_equal(twin.state_dict(), saved)
    assert twin.run_iteration(None) == expected
    assert _tensors_equal(_weights(twin_backbone), _weights(backbone))


# ----------------------------------------------------------------------------- registering from outside


@dataclass
class ToyMethod(Method):
    """Gradient ascent on the forget class at half strength, plain L_simple on the retained ones."""

    name = "toy"
    paper = "a test's toy"
    supports_latent_cache = False

    def forget_loss(self, backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_F = −½ · mean_i ℓ_i"""
        return -0.5 * backbone.per_sample_loss(x, y, cfg_dropout=self.forget_dropout).mean()


@pytest.fixture
def toy_method():
    register_method(ToyMethod)
    yield ToyMethod
    del METHODS[ToyMethod.name]
    forget_registry_caches()


def test_a_registered_method_runs_through_forget(tiny_model, tmp_path, toy_method):
    from diffusion_unlearn.unlearn import forget

    run = tmp_path / "run"
    cfg = build_config(ForgetConfig, dict(model=str(tiny_model), dataset="digits", forget_class=3, out=str(run),
                                          method="toy", iterations=2, batch_size=8, checkpoint_every=1,
                                          grid_per_class=1, steps=2, sample_batch_size=64))
    forget(cfg)
    log = [line for line in (run / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 2 and '"forget_loss"' in log[0]
    assert load_model_folder(run).meta.history[-1]["method"] == "toy"  # a run folder resolves to its model/
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (ToyMethod,), {"name": "toy"}))


class ToyBackbone(DDPMBackbone):
    """The pixel DDPM under another name, with its own sampler defaults."""

    name = "toy-ddpm"
    sampler_defaults = SamplerDefaults(sampler="ddpm", steps={"ddpm": 3, "ddim": 4},
                                       guidance_scale={"eval": 1.25, "grid": 2.5})


@pytest.fixture
def toy_backbone():
    register_backbone(ToyBackbone)
    yield ToyBackbone
    del BACKBONES[ToyBackbone.name]


def test_a_registered_backbone_is_dispatched(tmp_path, toy_backbone):
    torch.manual_seed(0)
    folder = tmp_path / "toy"
    save_model_folder(folder, ClassConditionalUNet.from_preset("tiny"),
                      ModelMeta(class_names=[str(i) for i in range(10)], backbone="toy-ddpm"))
    loaded = load_model_folder(folder)
    assert loaded.meta.backbone == "toy-ddpm" and type(loaded.backbone()) is ToyBackbone
    assert resolve_sampler(SamplerConfig(), "toy-ddpm", "eval").guidance_scale == 1.25
    record = sample(SampleConfig(model=str(folder), classes="0,1", per_class=1, out_dir=str(tmp_path / "pngs"),
                                 grid=str(tmp_path / "grid.png"), device="cpu"))
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("ddpm", 3, 1.25)
    assert record["grid_sampler"]["guidance_scale"] == 2.5 and (tmp_path / "grid.png").is_file()
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2


# ----------------------------------------------------------------------------- imports


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [n for n in names if not n.endswith("__main__")]


def _module_level_imports(module: str) -> set[str]:
    """The package modules `module` imports at module level (function bodies excluded)."""
    path = PACKAGE.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    known, found = set(_modules()), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found |= {base} if base in known else set()
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {module}


def test_no_import_cycle():
    graph = {m: _module_level_imports(m) for m in _modules()}
    assert "diffusion_unlearn.pipelines.sampling" in graph["diffusion_unlearn.sample"]
    done, active = set(), []

    def visit(m: str) -> None:
        if m in active:
            raise AssertionError("import cycle: " + " -> ".join([*active[active.index(m):], m]))
        if m in done:
            return
        active.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        active.pop()
        done.add(m)

    for m in graph:
        visit(m)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter of its own (one thread each, as many at once as there are cores)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda module: (module, subprocess.run([sys.executable, "-c", f"import {module}"],  # noqa: E731
                                                 capture_output=True, text=True, env=env))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(pool.map(run, _modules()))
    failed = [f"{m}: {r.stderr.strip().splitlines()[-1]}" for m, r in results if r.returncode]
    assert not failed, "\n".join(failed)
