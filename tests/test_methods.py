"""Forget methods: each loss pinned on known inputs, SalUn's top-k mask against an exact sort, SA's timestep-summed
Fisher against a direct per-timestep computation, partial decoupling against torch's Adam, and every method with
every optimizer setup end to end on a tiny model."""

import dataclasses
import json
import typing

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from diffusion_unlearn import global_batch, saliency
from diffusion_unlearn.cli import main
from diffusion_unlearn.config import CONFIG_DIR, ForgetConfig, MaskConfig, SamplerConfig, build_config, load_yaml
from diffusion_unlearn.data import forget_retain_split, load_dataset
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.methods import METHODS, build_method
from diffusion_unlearn.methods.baselines import FineTune, GradientAscent, RandomLabel
from diffusion_unlearn.methods.sa import SelectiveAmnesia, ewc_penalty
from diffusion_unlearn.methods.salun import SalUn, pseudo_labels
from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder
from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.optim import DualOptim, OptimizerSpec, SplitAdam
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import predict_eps
from diffusion_unlearn.seeds import image_seed
from diffusion_unlearn.saliency import gradient_saliency, load_mask, mask_metadata, topk_mask, topk_threshold
from diffusion_unlearn.unlearn import Unlearner, forget, mask, optimizer_spec






@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return DDPMBackbone(ClassConditionalUNet.from_preset("tiny").eval())


def _grads(backbone):
    return {n: p.grad.clone() for n, p in backbone.named_parameters().items()}


# ----------------------------------------------------------------------------- SalUn's top-k mask


def exact_topk(scores, fraction):
    """The reference's global ranking, with ties broken by position (a stable descending sort)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:int(fraction * len(flat))]] = True
    return dict(zip(scores, keep.split([s.numel() for s in scores.values()])))


@pytest.mark.parametrize("fraction", [0.0, 0.013, 0.5, 0.77, 1.0])
def test_topk_mask_equals_an_exact_sort_with_ties_across_slices(fraction, monkeypatch):
    monkeypatch.setattr(saliency, "TOPK_CHUNK", 37)  # many slices, ties spanning their borders
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.randint(0, 5, (40, 30), generator=g).float() * 0.1, "b": torch.rand(7, generator=g),
              "c": torch.randint(0, 5, (333,), generator=g).float() * 0.1, "d": torch.zeros(3, 3)}
    mask, exact = topk_mask(scores, fraction), exact_topk(scores, fraction)
    assert all(torch.equal(mask[k].reshape(-1), exact[k]) for k in scores)
    assert sum(int(m.sum()) for m in mask.values()) == int(fraction * 1549)


def test_topk_threshold_is_the_kth_largest_score():
    scores = {"a": torch.tensor([0.5, 2.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 3.0]])}
    assert topk_threshold(scores, 1) == (3.0, 1)
    assert topk_threshold(scores, 3) == (1.0, 1)  # 3, 2, then one of the three 1.0s
    assert topk_threshold(scores, 5) == (1.0, 3)
    assert topk_mask(scores, 0.5)["a"].tolist() == [False, True, True, False]  # the earliest tie wins
    with pytest.raises(UserError, match="finite"):
        topk_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5)


def test_salun_mask_is_topk_of_the_summed_gradient_on_a_model(backbone):
    data = load_dataset("digits").with_classes([3])
    torch.manual_seed(1)
    scores = gradient_saliency(backbone, data, batch_size=32, max_batches=2, seed=4)
    # direct: the same shuffle and noise (batch b's draws seeded with image_seed(seed, b)), |Σ_batches ∇ mean loss|
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(4))
    total = {n: torch.zeros_like(p) for n, p in backbone.named_parameters().items()}
    for b, idx in enumerate((order[:32], order[32:64])):
        backbone.denoiser.zero_grad()
        torch.manual_seed(image_seed(4, b))
        backbone.per_sample_loss(*data.get_batch(idx)).mean().backward()
        total = {n: total[n] + g for n, g in _grads(backbone).items()}
    assert all(torch.allclose(scores[n], total[n].abs(), atol=1e-6) for n in total)
    exact = exact_topk(scores, 0.5)
    assert all(torch.equal(m.reshape(-1), exact[k]) for k, m in topk_mask(scores, 0.5).items())


# ----------------------------------------------------------------------------- losses on known inputs


def test_pseudo_labels():
    y = torch.tensor([0, 3, 9])
    assert pseudo_labels(y, 10, "next").tolist() == [1, 4, 0]  # (c + 1) mod K, the reference's
    torch.manual_seed(0)
    drawn = pseudo_labels(torch.full((5000,), 3), 10, "random")
    assert set(drawn.tolist()) == set(range(10)) - {3}


@pytest.mark.parametrize("rule", ["next", "random"])
def test_salun_forget_loss_is_mse_to_the_detached_pseudo_label_prediction(backbone, rule):
    x, y = torch.randn(4, 1, 8, 8), torch.full((4,), 3)
    torch.manual_seed(7)
    loss = SalUn(salun_label=rule).forget_loss(backbone, x, y)
    loss.backward()
    got = _grads(backbone)
    backbone.denoiser.zero_grad()
    torch.manual_seed(7)  # by hand: one x_t, the target under c' with no gradient, the prediction under c
    t = torch.randint(0, 1000, (3,))
    t = torch.cat([t, 999 - t])[:4]  # antithetic
    noise = torch.randn_like(x)
    a = backbone.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    other = (y + 1) % 10 if rule == "next" else (y + torch.randint(1, 10, y.shape)) % 10
    target = predict_eps(backbone.denoiser, x_t, t, other).detach()
    expected = (predict_eps(backbone.denoiser, x_t, t, y) - target).square().mean()
    expected.backward()
    assert torch.equal(loss, expected)
    assert all(torch.allclose(got[n], g) for n, g in _grads(backbone).items())


class _FixedLossBackbone:
    """Per-sample losses fixed by the test; records the inputs and the label dropout of each call."""

    num_classes = 10

    def __init__(self, losses, params=None):
        self.losses, self.calls, self.params = losses, [], params or {}

    def per_sample_loss(self, x, y, *, cfg_dropout=0.0):
        self.calls.append((x, y, cfg_dropout))
        return self.losses

    def named_parameters(self):
        return self.params


def test_baseline_losses():
    losses = torch.tensor([1.0, 3.0])
    b = _FixedLossBackbone(losses)
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([4, 4])
    assert GradientAscent().forget_loss(b, x, y) == -2.0 and b.calls[-1][2] == 0.0
    assert GradientAscent(cfg_dropout_in_forget_loss=True).forget_loss(b, x, y) == -2.0 and b.calls[-1][2] == 0.1
    assert RandomLabel().forget_loss(b, x, y) == 2.0
    assert (b.calls[-1][1] != 4).all()  # relabelled to another class, true-noise target
    assert FineTune.forget_loss is None
    assert FineTune(retain_alpha=0.5).retain_loss(b, x, y) == 1.0 and b.calls[-1][2] == 0.1


def test_ewc_penalty_and_sa_retain_loss():
    theta = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[1.0]])}
    fisher = {"a": torch.tensor([2.0, 5.0]), "b": torch.tensor([[0.5]])}
    ewc = ewc_penalty(theta, fisher, anchor)  # 2·1² + 5·0² + 0.5·2²
    assert ewc.item() == 4.0
    ewc.backward()  # ∂/∂θ = 2F(θ − θ*)
    assert theta["a"].grad.tolist() == [4.0, 0.0] and theta["b"].grad.tolist() == [[2.0]]
    sa = SelectiveAmnesia(retain_alpha=2.0, ewc_lambda=10.0, cfg_dropout=0.0)
    sa.fisher, sa.anchor = fisher, anchor
    b = _FixedLossBackbone(torch.tensor([1.0, 3.0]), theta)
    assert sa.retain_loss(b, None, None).item() == 2.0 * 2.0 + 10.0 * 4.0  # ρ·mean ℓ + λ·EWC
    assert b.calls[-1][2] == 0.0
    moved = SelectiveAmnesia(retain_alpha=2.0, ewc_lambda=10.0, cfg_dropout=0.0, sa_ewc_step="forget")
    moved.fisher, moved.anchor = fisher, anchor  # the EWC term moves from the retain to the forget step's loss
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    assert moved.retain_loss(b, None, None).item() == 2.0 * 2.0
    assert moved.forget_loss(b, x, y).item() == 2.0 + 10.0 * 4.0 == sa.forget_loss(b, x, y).item() + 10.0 * 4.0


def test_sa_surrogate_is_fresh_uniform_noise_with_the_forget_label(backbone):
    x, y = torch.full((64, 1, 8, 8), 100.0), torch.full((64,), 3)
    b = _FixedLossBackbone(torch.tensor([2.0, 4.0]))
    torch.manual_seed(3)
    assert SelectiveAmnesia().forget_loss(b, x, y) == 3.0
    surrogate, labels, dropout = b.calls[-1]
    torch.manual_seed(3)
    assert torch.equal(surrogate, torch.rand_like(x) * 2 - 1) and torch.equal(labels, y) and dropout == 0.0
    assert surrogate.min() >= -1 and surrogate.max() <= 1 and surrogate.std() > 0.5  # x gives only the shape
    SelectiveAmnesia().forget_loss(b, x, y)
    assert not torch.equal(b.calls[-1][0], surrogate)  # drawn afresh each step


def test_timestep_summed_fisher_matches_a_direct_per_timestep_computation(backbone):
    backbone.denoiser.double()  # float64, so that round-off stays far below every real Fisher entry
    torch.manual_seed(2)
    images, labels = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 3, 7])
    fisher = saliency.timestep_summed_fisher(backbone, images, labels, timesteps=5, chunk=2, seed=9)
    steps = [0, 250, 500, 749, 999]  # 5 evenly spaced of 1000 (749.25 rounds down)
    direct = {n: torch.zeros_like(p) for n, p in backbone.named_parameters().items()}
    for i, (x, y) in enumerate(zip(images, labels)):
        torch.manual_seed(image_seed(9, i))  # sample i's noise: the global RNG seeded for it alone
        noise = torch.randn((5, 1, 8, 8), dtype=torch.float64)
        summed = {n: torch.zeros_like(p) for n, p in direct.items()}
        for j, t in enumerate(steps):  # one step at a time, by hand
            backbone.denoiser.zero_grad()
            a = backbone.schedule.alphas_cumprod[t]
            x_t = a.sqrt() * x + (1 - a).sqrt() * noise[j]
            eps = predict_eps(backbone.denoiser, x_t[None], torch.tensor([t]), y[None])
            (noise[j] - eps[0]).square().sum().backward()
            summed = {n: summed[n] + g for n, g in _grads(backbone).items()}
        direct = {n: direct[n] + (summed[n] * 1000 / 5).square() / 3 for n in direct}
    # atol: some entries are structurally 0 (e.g. biases before a GroupNorm), ~1e-25 here from round-off
    assert all(torch.allclose(fisher[n], direct[n], rtol=1e-8, atol=1e-16) for n in direct)
    one_chunk = saliency.timestep_summed_fisher(backbone, images, labels, timesteps=5, chunk=5, seed=9)
    assert all(torch.allclose(one_chunk[n], fisher[n], rtol=1e-8, atol=1e-16) for n in fisher)


# ----------------------------------------------------------------------------- optimizer setups


def _steps(opt, model, sides):
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    for side in sides:
        opt.zero_grad()
        (model(x).square().mean() * (-1 if side == "forget" else 1)).backward()
        opt.forget_step() if side == "forget" else opt.retain_step()
    return [p.detach().clone() for p in model.parameters()]


class _Split(DualOptim):
    """A DualOptim whose one optimizer is a SplitAdam with any `split`, to compare with torch's Adams."""

    def __init__(self, params, forget, retain, split):
        self.mode, self.split = "dual-" + split, SplitAdam(params, forget, retain, split)
        self.forget_optimizer = self.retain_optimizer = self.split


def test_split_adam_equals_two_adams_when_all_split_and_one_when_none():
    sides = ["forget", "retain", "retain", "forget", "retain", "forget"]
    forget, retain = OptimizerSpec("adamw", 3e-2, weight_decay=0.1), OptimizerSpec("adam", 1e-2, weight_decay=0.05)

    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        return _steps(make(model.parameters()), model, sides)

    # torch's Adams take their fused step, SplitAdam the multi-tensor formulas: equal up to the last bits
    def same(a, b):
        return all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))

    dual = run(lambda p: DualOptim(p, forget, retain, mode="dual"))
    assert same(run(lambda p: _Split(p, forget, retain, "mv")), dual)
    shared = run(lambda p: DualOptim(p, forget, retain, mode="shared"))  # the retain spec does both steps
    assert same(run(lambda p: _Split(p, retain, retain, "")), shared)
    for mode in ("dual-m", "dual-v"):
        partial = run(lambda p: DualOptim(p, forget, retain, mode=mode))
        assert not any(torch.allclose(a, b, rtol=1e-3) for a, b in zip(partial, dual))
    with pytest.raises(UserError, match="same beta1"):
        DualOptim([torch.nn.Parameter(torch.ones(1))], OptimizerSpec(betas=(0.8, 0.999)), OptimizerSpec(), "dual-v")
    with pytest.raises(UserError, match="adam or adamw"):
        DualOptim([torch.nn.Parameter(torch.ones(1))], OptimizerSpec("sgd"), OptimizerSpec(), "dual-m")


def test_per_side_optimizer_settings_reach_the_optimizers(tiny_model):
    cfg = build_config(ForgetConfig, dict(forget_optim="adam", forget_betas=(0.8, 0.99), retain_optim="sgd",
                                          retain_momentum=0.5, retain_lr=3e-3, momentum=0.7))
    data = load_dataset("digits")
    learner = Unlearner(cfg, DDPMBackbone(load_model_folder(tiny_model).denoiser), *forget_retain_split(data, 0), None,
                        Accelerator(cpu=True))
    forget_group = learner.optim.forget_optimizer.param_groups[0]
    retain_group = learner.optim.retain_optimizer.param_groups[0]
    assert isinstance(learner.optim.forget_optimizer, torch.optim.Adam) and forget_group["betas"] == (0.8, 0.99)
    assert isinstance(learner.optim.retain_optimizer, torch.optim.SGD)
    assert retain_group["momentum"] == 0.5 and retain_group["lr"] == 3e-3
    both = dict(betas=(0.5, 0.9), momentum=0.7, forget_momentum=0.0)
    default = optimizer_spec(build_config(ForgetConfig, both), "forget")
    assert default.betas == (0.5, 0.9) and default.momentum == 0.0  # a side's own value, else the shared one
    assert optimizer_spec(build_config(ForgetConfig, {"momentum": 0.7}), "retain").momentum == 0.7


# ----------------------------------------------------------------------------- end to end


SA_TINY = dict(sa_samples_per_class=2, sa_fisher_timesteps=3, sa_fisher_chunk=2)  # SA's own arguments


def _cfg(model, out, **kw):
    base = dict(model=str(model), dataset="digits", forget_class=3, out=str(out), iterations=2, batch_size=16,
                fisher_batch_size=64, fisher_max_batches=1, checkpoint_every=1, grid_per_class=1,
                sampler=SamplerConfig(steps=2, sample_batch_size=64), **(SA_TINY if kw.get("method") == "sa" else {}))
    base.update(kw)
    return build_config(ForgetConfig, base)


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


RUNS = [(m, o, "alternate") for m in METHODS for o in ("dual", "shared")]
RUNS += [("salun", "shared", "joint"), ("sa", "shared", "joint"), ("sfron", "dual-m", "alternate"),
         ("sfron", "dual-v", "alternate")]


class _FirstForgetStep:
    """Wraps a method's forget loss to keep, at its first call, the labels, the weights and the gradient of that
    loss on the loop's own batch and randomness (the RNG is rewound so the loop's call draws the same); the step
    callback then keeps how far the first forget step moved each weight."""

    def __init__(self, monkeypatch, method_class):
        self.grads, self.moved = None, None
        original = method_class.forget_loss

        def wrapped(method, backbone, x, y):
            if self.grads is None:
                params = backbone.named_parameters()
                self.labels, self.params = y.clone(), params
                self.before = {n: p.detach().clone() for n, p in params.items()}
                key = global_batch.active()  # the same keyed draws as the loss the loop computes next
                with global_batch.keyed(dataclasses.replace(key, draws_made=dict(key.draws_made))):
                    grads = torch.autograd.grad(original(method, backbone, x, y), list(params.values()),
                                                allow_unused=True)
                self.grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
            return original(method, backbone, x, y)

        monkeypatch.setattr(method_class, "forget_loss", wrapped)

    def callback(self, iteration, phase):
        if phase == "forget" and self.moved is None:
            self.moved = {n: p.detach() - self.before[n] for n, p in self.params.items()}


@pytest.mark.parametrize("method, optim, schedule", RUNS)
def test_every_method_runs_end_to_end(tiny_model, tmp_path, monkeypatch, method, optim, schedule):
    """Every method × optimizer setup runs and records itself; each first forget step descends that method's own
    forget loss on forget-class images (a fresh optimizer moves every weight against its gradient) without moving
    masked weights; SA's EWC term uses the saved Fisher and the base weights as anchor."""
    run = tmp_path / "run"
    first = _FirstForgetStep(monkeypatch, METHODS[method]) if METHODS[method].forget_loss is not None else None
    ewc_calls = []

    def recorded_ewc(params, fisher, anchor):
        ewc_calls.append((fisher, anchor))
        return ewc_penalty(params, fisher, anchor)

    monkeypatch.setattr("diffusion_unlearn.methods.sa.ewc_penalty", recorded_ewc)
    result = forget(_cfg(tiny_model, run, method=method, optim=optim, schedule=schedule),
                    callback=first.callback if first else None)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [0, 1]
    assert all(("forget_loss" in r) == (method != "ft") for r in log)
    assert load_model_folder(run / "model").meta.history[-1]["method"] == method
    assert torch.load(run / "optimizers.pt", weights_only=True)["mode"] == optim
    assert (run / "mask.safetensors").exists() == (METHODS[method].mask_kind is not None)
    assert (run / "replay.safetensors").exists() == (run / "sa_fisher.safetensors").exists() == (method == "sa")
    before, after = _weights(tiny_model), _weights(run / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    keep = load_mask(run / "mask.safetensors") if (run / "mask.safetensors").exists() else {}
    if first is not None and schedule == "alternate":
        assert (first.labels == 3).all()
        against = along = movable = 0
        for name, step in first.moved.items():
            grad, free = first.grads[name], keep.get(name, torch.ones_like(step, dtype=torch.bool))
            assert not step[~free].any(), f"the forget step moved masked weights of {name}"
            along += int((step * grad > 0).sum())
            against += int((step * grad < 0).sum())
            movable += int((grad[free] != 0).sum())
        assert along == 0 and against > 0.99 * movable, (along, against, movable)
    if method == "salun":  # top-k mask on the forget and the retain gradients: masked weights never move
        assert result["mask_density"] == pytest.approx(0.5, abs=1e-6)
        assert mask_metadata(run / "mask.safetensors")["kind"] == "topk"
        for k, free in keep.items():
            assert torch.equal(before[k][~free], after[k][~free]), k
    if method == "sa":
        replay = load_file(run / "replay.safetensors")
        assert replay["pixels"].dtype == torch.uint8 and replay["labels"].tolist() == [c for c in range(10)
                                                                                      for _ in range(2)]
        saved = load_file(run / "sa_fisher.safetensors")
        assert len(ewc_calls) == 2 and any(f.any() for f in saved.values())  # one retain (or joint) step each
        for fisher, anchor in ewc_calls:
            assert fisher.keys() == anchor.keys() == saved.keys()
            assert all(torch.equal(fisher[n], saved[n]) and torch.equal(anchor[n], before[n]) for n in saved)
    else:
        assert not ewc_calls


class _Kill(Exception):
    pass


@pytest.mark.parametrize("optim", ["dual", "dual-m"])
def test_sa_resumes_bitwise_reusing_its_replay_and_fisher(tiny_model, tmp_path, monkeypatch, optim):
    forget(_cfg(tiny_model, tmp_path / "full", method="sa", iterations=3, optim=optim))

    def kill(iteration, phase):
        if iteration == 2 and phase == "forget":
            raise _Kill

    with pytest.raises(_Kill):
        forget(_cfg(tiny_model, tmp_path / "resumed", method="sa", iterations=3, optim=optim), callback=kill)

    def refuse(*args, **kwargs):
        raise AssertionError("the cached replay set and Fisher must be reused on resume")

    monkeypatch.setattr(DDPMBackbone, "generate", refuse)
    monkeypatch.setattr("diffusion_unlearn.methods.sa.timestep_summed_fisher", refuse)
    forget(_cfg(tiny_model, tmp_path / "resumed", method="sa", iterations=3, optim=optim))
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mask_command_makes_a_topk_mask(tiny_model, tmp_path):
    out = mask(build_config(MaskConfig, dict(model=str(tiny_model), forget_class=3, out=str(tmp_path / "m.safetensors"),
                                             kind="topk", topk_fraction=0.25, fisher_batch_size=64,
                                             fisher_max_batches=1)))
    meta = mask_metadata(tmp_path / "m.safetensors")
    assert meta["kind"] == "topk" and meta["topk_fraction"] == 0.25 and out["density"] == pytest.approx(0.25, abs=1e-6)


# ----------------------------------------------------------------------------- registry, presets, `methods`


def test_registry_presets_and_methods_command(capsys):
    with pytest.raises(UserError, match="unknown method 'nope'; choose one of " + ", ".join(METHODS)):
        build_config(ForgetConfig, {"method": "nope"})
    for path in CONFIG_DIR.glob("digits-*.yaml"):
        data = load_yaml(path)
        if "method" in data:  # a forget preset: it builds, and names a registered method
            cfg = build_config(ForgetConfig, {k: v for k, v in data.items() if not k.startswith("_")})
            assert type(build_method(cfg)) is METHODS[cfg.method]
    assert main(["methods"]) == 0
    table = capsys.readouterr().out
    for name, method in METHODS.items():
        assert f"| {name} | {method.paper} |" in table
    assert "digits-salun-joint:" in table and "retain_alpha=0.001" in table
