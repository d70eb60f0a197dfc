"""`--sampling-precision auto|fp32|bf16`: float32 for DiT evaluation and under `--protocol paper`, bf16 autocast
only on CUDA (refused on the CPU with one line), recorded in every output."""

from __future__ import annotations

import json

import pytest
import torch
from test_dit import tiny_dit, tiny_vae  # tests/ is on sys.path (pytest's rootdir-relative import)

from diffusion_unlearn.cli import main
from diffusion_unlearn.config import EvalConfig, SampleConfig, SamplerConfig, build_config, protocol_deviations
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.modelfolder import ModelMeta, save_model_folder
from diffusion_unlearn.pipelines import pipeline_class_conditional, pipeline_dit
from diffusion_unlearn.pipelines.pipeline_class_conditional import ClassConditionalPipeline, training_scheduler
from diffusion_unlearn.pipelines.pipeline_dit import ClassConditionalDiTPipeline, dit_training_scheduler
from diffusion_unlearn.sampler_defaults import resolve_sampler


def _precision(backbone: str, purpose: str, device: str, sampler: SamplerConfig | None = None) -> str:
    return resolve_sampler(sampler or SamplerConfig(), backbone, purpose, device).sampling_precision


def test_auto_is_fp32_except_dit_grids_on_cuda():
    assert _precision("dit", "eval", "cuda") == "fp32"  # as the original's sample_ddp.py
    assert _precision("dit", "grid", "cuda") == "bf16"  # today's fast grids
    assert _precision("ddpm", "eval", "cuda") == _precision("ddpm", "grid", "cuda") == "fp32"
    for backbone in ("dit", "ddpm"):
        for purpose in ("eval", "grid"):
            assert _precision(backbone, purpose, "cpu") == "fp32"
    assert _precision("dit", "eval", "cuda", SamplerConfig(sampling_precision="bf16")) == "bf16"  # explicit wins


def test_paper_protocol_sets_fp32_beneath_explicit_flags():
    for cls in (EvalConfig, SampleConfig):
        paper = build_config(cls, {"protocol": "paper"})
        assert paper.sampler.sampling_precision == "fp32"
        assert _precision("dit", "grid", "cuda", paper.sampler) == "fp32"
        assert build_config(cls, {}).sampler.sampling_precision == "auto"
    explicit = build_config(EvalConfig, {"protocol": "paper", "sampling_precision": "bf16"})
    assert protocol_deviations(explicit) == {"sampling_precision": "bf16"}


def test_bf16_off_cuda_is_refused_with_one_line():
    with pytest.raises(UserError, match="needs a CUDA device") as err:
        resolve_sampler(SamplerConfig(sampling_precision="bf16"), "dit", "grid", "cpu")
    assert "\n" not in str(err.value) and "--sampling-precision fp32" in str(err.value)
    pipe = ClassConditionalDiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=dit_training_scheduler())
    with pytest.raises(UserError, match="needs a CUDA device"):
        pipe.sample_latents([0], num_inference_steps=2, precision="bf16", progress=False)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "model"
    save_model_folder(path, tiny_dit(), ModelMeta(class_names=[f"c{c}" for c in range(10)], weights="raw"),
                      vae=tiny_vae())
    return path


def test_sample_records_the_precision_and_refuses_cpu_bf16(dit_folder, tmp_path, capsys):
    folder = tmp_path / "pngs"
    args = ["sample", "--model", str(dit_folder), "--classes", "1", "--per-class", "1", "--sampler", "ddim",
            "--steps", "2", "--device", "cpu"]
    assert main([*args, "--out-dir", str(folder)]) == 0
    assert json.loads((folder / "samples.json").read_text())["sampling_precision"] == "fp32"
    capsys.readouterr()
    assert main([*args, "--out-dir", str(tmp_path / "bf16"), "--sampling-precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA device" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bf16").exists()  # refused before any sampling


def _force_cpu_bf16(monkeypatch, module) -> None:
    """Let `precision="bf16"` through on the CPU (CPU autocast supports bf16), to see the switch reach the model."""
    monkeypatch.setattr(module, "bf16_autocast", lambda precision, device: precision == "bf16")


def test_dit_pipeline_runs_the_transformer_in_the_requested_precision(monkeypatch):
    pipe = ClassConditionalDiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=dit_training_scheduler())
    kw = dict(num_inference_steps=3, guidance_scale=4.0, progress=False)
    fp32 = pipe.sample_latents([0, 3], **kw)
    assert torch.equal(fp32, pipe.sample_latents([0, 3], precision="fp32", **kw))  # fp32 is the default
    _force_cpu_bf16(monkeypatch, pipeline_dit)
    bf16 = pipe.sample_latents([0, 3], precision="bf16", **kw)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).norm() < 0.05 * fp32.norm()  # the same samples, up to bf16 rounding


def test_ddpm_pipeline_autocasts_only_when_asked(tiny_model, monkeypatch):
    from diffusion_unlearn.modelfolder import load_model_folder

    unet = load_model_folder(tiny_model).denoiser
    pipe = ClassConditionalPipeline(unet=unet, scheduler=training_scheduler())
    kw = dict(num_inference_steps=2, guidance_scale=3.0, batch_size=2, progress=False)
    fp32 = pipe([1, 2], **kw)
    _force_cpu_bf16(monkeypatch, pipeline_class_conditional)
    bf16 = pipe([1, 2], precision="bf16", **kw)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.equal(fp32, pipe([1, 2], precision="fp32", **kw))
