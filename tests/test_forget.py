"""End to end on a tiny model: forget writes every output; a killed run resumes bitwise; bad input fails fast."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from diffusion_unlearn import global_batch
from diffusion_unlearn.config import (ForgetConfig, MaskConfig, SamplerConfig, build_config, config_to_dict,
                                      yaml_values)
from diffusion_unlearn.data import BatchStream, forget_retain_split, load_dataset
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.methods import build_method
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.saliency import GradientMask, load_mask, mask_metadata
from diffusion_unlearn.sampler_defaults import resolve_sampler
from diffusion_unlearn.unlearn import Unlearner, forget, mask, optimizer_spec




def _cfg(model, out, **kw):
    base = dict(model=str(model), dataset="digits", forget_class=3, out=str(out), iterations=4, batch_size=16,
                fisher_batch_size=64, fisher_max_batches=2, checkpoint_every=1, grid_per_class=2,
                sampler=SamplerConfig(steps=2, sample_batch_size=64))
    base.update(kw)
    return build_config(ForgetConfig, base)


def test_forget_writes_every_output(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run")
    result = forget(cfg)
    run = tmp_path / "run"
    for name in ("model/model_index.json", "model/diffusion_unlearn.json", "mask.safetensors", "config.yaml",
                 "log.jsonl", "optimizers.pt", "ema.safetensors", "grid-before.png", "grid-after.png"):
        assert (run / name).exists(), name
    # config.yaml is the whole resolved config: `--config` builds it back (the sampler resolved for the model)
    again = build_config(ForgetConfig, yaml_values(ForgetConfig, run / "config.yaml"))
    assert again == replace(cfg, sampler=resolve_sampler(cfg.sampler, "ddpm", "grid"))
    assert config_to_dict(again) == result["config"]
    assert not (run / "state.pt").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [0, 1, 2, 3]
    assert all({"forget_loss", "retain_loss", "alpha"} <= set(r) for r in log)
    optim = torch.load(run / "optimizers.pt", weights_only=True)
    assert optim["mode"] == "dual" and optim["forget"]["state"] and optim["retain"]["state"]
    loaded = load_model_folder(run / "model")
    assert loaded.meta.weights == "raw" and loaded.meta.forgotten_classes == [3]
    assert loaded.meta.history[-1]["method"] == "sfron"
    # the input model folder is untouched
    base = load_model_folder(tiny_model)
    changed = [k for k, v in base.denoiser.state_dict().items() if not torch.equal(v, loaded.denoiser.state_dict()[k])]
    assert changed
    assert load_mask(run / "mask.safetensors", loaded.denoiser)
    assert 0 < result["mask_density"] < 1


def _masked_moves_per_step(tiny_model, out, monkeypatch, optim) -> dict[str, list[int]]:
    """Run forget (one forget and one retain step per iteration) and count, for each step, the masked coordinates
    it moved. The mask the loop applies is caught where it is built (before any step); each forget
    step is compared with the weights after the step before it (a retain step, or the base model for the first)."""
    caught = []
    build = GradientMask.__init__

    def catch(self, model, mask):
        build(self, model, mask)
        caught.append((self, [p.detach().clone() for p in self.params]))

    monkeypatch.setattr(GradientMask, "__init__", catch)
    moved = {"forget": [], "retain": []}

    def check(iteration, phase):
        (gm, last), = caught
        assert any((p.detach() != b).any() for p, b in zip(gm.params, last)), f"the {phase} step moved nothing"
        moved[phase].append(sum(int((p.detach() != b)[~keep].sum())
                                for p, b, keep in zip(gm.params, last, gm.factors)))
        caught[0] = (gm, [p.detach().clone() for p in gm.params])

    forget(_cfg(tiny_model, out, optim=optim, forget_steps=1, retain_steps=1), callback=check)
    return moved


def test_masked_weights_do_not_move_under_dual(tiny_model, tmp_path, monkeypatch):
    """Retain steps (unmasked) move masked weights; the forget optimizer must still leave them exactly in place
    under dual, while the one shared Adam carries retain momentum into masked coordinates at the forget step."""
    dual = _masked_moves_per_step(tiny_model, tmp_path / "dual", monkeypatch, "dual")
    assert all(n > 0 for n in dual["retain"]), dual  # SFRon's retain gradient is not masked
    assert dual["forget"] == [0, 0, 0, 0], dual
    monkeypatch.undo()
    shared = _masked_moves_per_step(tiny_model, tmp_path / "shared", monkeypatch, "shared")
    assert shared["forget"][0] == 0, shared  # the first forget step precedes any retain step
    assert all(n > 0 for n in shared["forget"][1:]), shared


class _Kill(Exception):
    pass


@pytest.mark.parametrize("optim", ["dual", "shared"])
def test_killed_run_resumes_bitwise(tiny_model, tmp_path, optim):
    forget(_cfg(tiny_model, tmp_path / "full", optim=optim, checkpoint_every=2))

    def kill(iteration, phase):  # between the forget and the retain step of iteration 3
        if iteration == 3 and phase == "forget":
            raise _Kill

    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, tmp_path / "resumed", optim=optim, checkpoint_every=2), callback=kill)
    assert (tmp_path / "resumed" / "state.pt").exists() and not (tmp_path / "resumed" / "model").exists()
    forget(_cfg(tiny_model, tmp_path / "resumed", optim=optim, checkpoint_every=2))
    a = load_file(tmp_path / "full" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x)["iteration"] for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2, 3]


def test_joint_step_is_one_retain_optimizer_step_on_the_weighted_sum(tiny_model):
    """Iteration k = 1 of K = 4 under the joint schedule equals, bitwise, one step of the retain optimizer on
    ℓ_R + α_k·ℓ_F computed by hand from the same batches and randomness (α_k = α(1 + cos(πk/K))/2, mask applied,
    then clipped); its log record holds α_k, ℓ_F and that weighted sum."""
    cfg = build_config(ForgetConfig, dict(dataset="digits", forget_class=3, schedule="joint", iterations=4, alpha=2.0,
                                          batch_size=8))
    forget_set, retain_set = forget_retain_split(load_dataset("digits"), 3)
    backbone = DDPMBackbone(load_model_folder(tiny_model).denoiser)
    torch.manual_seed(0)
    keep = {n: torch.rand(p.shape) < 0.7 for n, p in backbone.named_parameters().items()}
    learner = Unlearner(cfg, backbone, forget_set, retain_set, GradientMask(backbone.denoiser, keep),
                        Accelerator(cpu=True))
    base = {n: p.detach().clone() for n, p in backbone.named_parameters().items()}
    learner.run_iteration(None)  # k = 0: the retain optimizer now holds moments
    hand_backbone = DDPMBackbone(copy.deepcopy(backbone.denoiser).train())  # the step by hand, on copies of all it reads
    params = list(hand_backbone.named_parameters().values())
    optimizer = optimizer_spec(cfg, "retain").build(params)
    optimizer.load_state_dict(copy.deepcopy(learner.optim.retain_optimizer.state_dict()))
    streams = []
    for stream, data in ((learner.forget_stream, forget_set), (learner.retain_stream, retain_set)):
        streams.append(BatchStream(data, cfg.batch_size, seed=cfg.seed, name=stream.name))
        streams[-1].load_state_dict(stream.state_dict())
    alpha_k = 2.0 * (1 + math.cos(math.pi / 4)) / 2
    method = build_method(cfg)
    xf, yf = streams[0].next()  # (B, C, H, W), (B,)
    assert (yf == 3).all()
    with global_batch.keyed(streams[0].key):  # the loop's draws: keyed by the batch, not the global RNG
        forget_loss = method.forget_loss(hand_backbone, xf, yf)
    xr, yr = streams[1].next()
    with global_batch.keyed(streams[1].key):
        retain_loss = method.retain_loss(hand_backbone, xr, yr)
    total = retain_loss + alpha_k * forget_loss
    total.backward()
    for p, k in zip(params, keep.values()):
        p.grad *= k
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()

    record = learner.run_iteration(None)
    assert record["alpha"] == pytest.approx(alpha_k, rel=1e-12)
    assert record["forget_loss"] == forget_loss.item() and record["joint_loss"] == total.item()
    after = backbone.named_parameters()
    for (name, p), mine in zip(after.items(), params):
        assert torch.equal(p.detach(), mine.detach()), name
        assert torch.equal(p.detach()[~keep[name]], base[name][~keep[name]]), name  # one masked step per iteration


def test_nonfinite_loss_stops_and_keeps_last_good_state(tiny_model, tmp_path, monkeypatch):
    from diffusion_unlearn.methods.sfron import SFRon

    calls = {"n": 0}
    original = SFRon.retain_loss

    def poisoned(self, backbone, x, y):
        calls["n"] += 1
        loss = original(self, backbone, x, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(SFRon, "retain_loss", poisoned)
    with pytest.raises(UserError, match="retain loss became nan at iteration 2"):
        forget(_cfg(tiny_model, tmp_path / "nan"))
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("change, message", [
    (dict(forget_class=10), "outside the model's classes 0..9"),
    (dict(dataset="nonexistent"), "unknown dataset|nonexistent"),
    (dict(mask="/nonexistent/mask.safetensors"), "mask file not found"),
])
def test_bad_input_fails_before_training(tiny_model, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        forget(_cfg(tiny_model, tmp_path / "bad", **change))
    assert not (tmp_path / "bad" / "state.pt").exists()


def test_output_folder_equal_to_input_is_refused(tiny_model, tmp_path):
    with pytest.raises(UserError, match="input model folder"):
        forget(_cfg(tiny_model, tiny_model))
    with pytest.raises(UserError, match="input model folder"):
        forget(_cfg(tiny_model, tiny_model / "inside"))


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_model):
    with pytest.raises(UserError, match="model folder not found"):
        forget(_cfg(tmp_path / "missing", tmp_path / "out"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read the model"):
        forget(_cfg(broken, tmp_path / "out"))


def test_dataset_shape_mismatch(tmp_path):
    torch.manual_seed(0)
    rgb = tmp_path / "rgb"
    save_model_folder(rgb, ClassConditionalUNet.from_preset("tiny", in_channels=3, out_ch=3),
                      ModelMeta(class_names=[str(i) for i in range(10)]))
    with pytest.raises(UserError, match="3-channel 8px"):
        forget(_cfg(rgb, tmp_path / "out"))


def test_mask_command_and_reuse(tiny_model, tmp_path):
    cfg = build_config(MaskConfig, dict(model=str(tiny_model), forget_class=3, out=str(tmp_path / "m.safetensors"),
                                        fisher_batch_size=64, fisher_max_batches=1))
    out = mask(cfg)
    meta = mask_metadata(tmp_path / "m.safetensors")
    assert meta["gamma"] == 3.0 and meta["forget_class"] == 3 and meta["density"] == pytest.approx(out["density"])
    forget(_cfg(tiny_model, tmp_path / "run", mask=str(tmp_path / "m.safetensors"), iterations=1))
    a, b = load_mask(tmp_path / "m.safetensors"), load_mask(tmp_path / "run" / "mask.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_probe_is_logged_and_leaves_training_unchanged(tiny_model, tmp_path):
    """Curve probes (the study's FA/FID over iterations) sample from the weights in training: the run must end
    bitwise where an unprobed run ends, with the probe's values in the log records of the probed iterations."""
    from diffusion_unlearn.pipelines.sampling import generate
    from diffusion_unlearn.unlearn import Probe

    def measure(pipeline):
        images, _, _ = generate(pipeline, [3], 2, SamplerConfig(sampler="ddpm", steps=2, guidance_scale=3.0),
                                progress=False)
        torch.rand(5)  # a probe that draws from the global RNG must not shift training's noise
        return {"probe_mean": images.mean().item()}

    forget(_cfg(tiny_model, tmp_path / "plain"))
    forget(_cfg(tiny_model, tmp_path / "probed"), probe=Probe(every=3, measure=measure))
    a = load_file(tmp_path / "plain" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "probed" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "probed" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "probe_mean" in r] == [2, 3]  # after the 3rd and the last iteration
