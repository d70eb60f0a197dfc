"""DualOptim: the masking property the paper relies on (reference §3.1), state round-trips, optimizer specs."""

import copy

import pytest
import torch

from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.optim import DualOptim, OptimizerSpec
from diffusion_unlearn.saliency import GradientMask


def _run(shared: bool, spec: OptimizerSpec):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    mask = {"weight": torch.rand(4, 6) > 0.5, "bias": torch.tensor([True, False, True, False])}
    gm = GradientMask(model, mask)
    opt = DualOptim(model.parameters(), spec, spec, mode="shared" if shared else "dual")
    x = torch.randn(16, 6)
    for _ in range(3):
        # retain step: unmasked gradient on every coordinate
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.retain_step()
        # forget step: masked gradient, then observe which coordinates moved
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        (-model(x).sum()).backward()
        gm.apply()
        opt.forget_step()
    moved = {n: p.detach() != before[n] for n, p in model.named_parameters()}
    return mask, moved


@pytest.mark.parametrize("spec", [OptimizerSpec("adamw", 1e-2), OptimizerSpec("adam", 1e-2),
                                  OptimizerSpec("sgd", 1e-2, momentum=0.9)])
def test_masked_coordinates_frozen_under_dual_but_moved_under_shared(spec):
    mask, moved = _run(shared=False, spec=spec)
    for n in mask:
        assert not moved[n][~mask[n]].any(), f"dual moved masked coordinates of {n}"
        assert moved[n][mask[n]].all()
    mask, moved = _run(shared=True, spec=spec)
    masked_moved = sum(int(moved[n][~mask[n]].sum()) for n in mask)
    assert masked_moved > 0, "shared momentum should carry retain gradients into masked coordinates"


def test_default_weight_decay_is_zero():
    # torch's AdamW default (0.01) would move masked weights
    assert OptimizerSpec().weight_decay == 0.0
    opt = OptimizerSpec("adamw").build([torch.nn.Parameter(torch.ones(2))])
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_state_round_trip_continues_identically():
    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        return m, DualOptim(m.parameters(), OptimizerSpec("adamw", 1e-2), OptimizerSpec("sgd", 1e-2))

    def step(m, o, forget):
        o.zero_grad()
        (m(torch.ones(1, 3)).sum() * (-1 if forget else 1)).backward()
        o.forget_step() if forget else o.retain_step()

    m1, o1 = make()
    for f in (True, False, True):
        step(m1, o1, f)
    state, weights = copy.deepcopy(o1.state_dict()), {k: v.clone() for k, v in m1.state_dict().items()}
    step(m1, o1, False)
    m2, o2 = make()
    m2.load_state_dict(weights)
    o2.load_state_dict(state)
    assert len(state["forget"]["state"]) == 2 and len(state["retain"]["state"]) == 2  # both states saved
    step(m2, o2, False)
    for k in weights:
        assert torch.equal(m1.state_dict()[k], m2.state_dict()[k])
    _, shared = make()[0], DualOptim(m2.parameters(), OptimizerSpec(), OptimizerSpec(), mode="shared")
    with pytest.raises(UserError):
        shared.load_state_dict(state)


def test_shared_uses_one_optimizer_and_unknown_name_errors():
    m = torch.nn.Linear(2, 2)
    o = DualOptim(m.parameters(), OptimizerSpec("sgd"), OptimizerSpec("adamw"), mode="shared")
    assert o.forget_optimizer is o.retain_optimizer and isinstance(o.retain_optimizer, torch.optim.AdamW)
    with pytest.raises(UserError, match="unknown optimizer"):
        OptimizerSpec("lion").build(m.parameters())


def test_gradient_mask_keeps_bool_factors_and_masks_bitwise():
    model = torch.nn.Linear(5, 3)
    mask = {"weight": torch.rand(3, 5) > 0.5, "bias": torch.tensor([True, False, True])}
    gm = GradientMask(model, mask)
    assert all(f.dtype == torch.bool for f in gm.factors)
    assert gm.factors[0].data_ptr() == mask["weight"].data_ptr()  # no copy of the mask on its device
    grads = {"weight": torch.randn(3, 5), "bias": torch.tensor([float("nan"), float("inf"), -2.0])}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    gm.apply()
    for n, p in model.named_parameters():
        expected = grads[n] * mask[n].float()
        assert torch.equal(p.grad.isnan(), expected.isnan())
        assert torch.equal(p.grad.nan_to_num(), expected.nan_to_num())


def _lean_vs_dense(spec: OptimizerSpec, lean: bool, steps: int = 4, moved_out: list | None = None):
    """A small conv net under dual: retain steps on every weight, forget steps masked and clipped."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 3))
    g = torch.Generator().manual_seed(1)
    mask = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    gm = GradientMask(model, mask)
    opt = DualOptim(model.parameters(), spec, OptimizerSpec("adamw", 1e-2), mode="dual",
                    masks=gm.factors if lean else None)
    x = torch.randn(8, 2, 6, 6, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.retain_step()
        opt.zero_grad()
        (-model(x).square().sum()).backward()
        gm.apply()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.forget_step()
        if moved_out is not None:  # masked-out entries the forget step changed
            moved_out.append(sum(int((p != b)[~m].sum()) for p, b, m in zip(model.parameters(), before,
                                                                          mask.values())))
    return model, mask, opt


@pytest.mark.parametrize("spec", [OptimizerSpec("adamw", 1e-2), OptimizerSpec("adam", 1e-2),
                                  OptimizerSpec("sgd", 1e-2, momentum=0.9)])
def test_masked_state_forget_side_is_bitwise_the_dense_update(spec):
    from diffusion_unlearn.optim import MaskedStateOptimizer

    dense, mask, _ = _lean_vs_dense(spec, lean=False)
    lean, _, opt = _lean_vs_dense(spec, lean=True)
    assert isinstance(opt.forget_optimizer, MaskedStateOptimizer)
    for (n, a), b in zip(dense.named_parameters(), lean.parameters()):
        assert torch.equal(a, b), n
    packed = sum(t.numel() for st in opt.forget_optimizer.state for t in st.values() if t.ndim)
    per_entry = 1 if spec.name == "sgd" else 2
    assert packed == per_entry * sum(int(m.sum()) for m in mask.values())  # state only where the mask is 1
    if spec.name != "sgd":  # Adam's moments: views of one flat buffer each (no per-tensor heap allocations)
        for key in ("exp_avg", "exp_avg_sq"):
            assert len({st[key].untyped_storage().data_ptr() for st in opt.forget_optimizer.state}) == 1


def test_masked_state_never_moves_masked_out_weights_with_weight_decay():
    spec = OptimizerSpec("adamw", 1e-2, weight_decay=0.1)
    dense_moved, lean_moved = [], []
    _lean_vs_dense(spec, lean=False, moved_out=dense_moved)
    _lean_vs_dense(spec, lean=True, moved_out=lean_moved)
    assert all(n > 0 for n in dense_moved)  # dense AdamW's decoupled decay shrinks masked-out weights
    assert lean_moved == [0] * len(lean_moved)  # the masked state never touches them


def test_masked_state_round_trips():
    spec = OptimizerSpec("adamw", 1e-2)
    model, _, opt = _lean_vs_dense(spec, lean=True, steps=2)
    state = copy.deepcopy(opt.state_dict())
    twin, _, opt2 = _lean_vs_dense(spec, lean=True, steps=2)
    opt2.load_state_dict(state)
    for a, b in zip(opt.forget_optimizer.state, opt2.forget_optimizer.state):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_size_groups_bound_foreach_temporaries_and_change_no_update():
    from diffusion_unlearn.optim import size_groups

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7, 20, 3, 4)]
    groups = size_groups(params, limit=12)
    assert [[p.numel() for p in g["params"]] for g in groups] == [[5, 7], [20], [3, 4]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grouped = torch.optim.AdamW(size_groups(params, limit=12), lr=1e-2, foreach=True)
    single = torch.optim.AdamW(twins, lr=1e-2, foreach=True)
    for _ in range(3):
        for ps, opt in ((params, grouped), (twins, single)):
            opt.zero_grad()
            sum((p * p.detach().sign()).sum() for p in ps).backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_mask_positions_decode_to_the_mask_s_nonzero_positions():
    from diffusion_unlearn.optim import MaskPositions

    g = torch.Generator().manual_seed(0)
    sparse = torch.zeros(3000, dtype=torch.bool)
    sparse[[0, 255, 511, 512, 2999]] = True  # gaps 255 (a byte) and 256 (too far for one)
    for mask in (sparse, torch.rand(40, 50, generator=g) < 0.3, torch.zeros(7, dtype=torch.bool),
                 torch.ones(2, 3, dtype=torch.bool), torch.rand(5000, generator=g) < 0.002):
        packed = MaskPositions.of(mask)
        assert packed.gaps.dtype == torch.uint8 and len(packed) == int(mask.sum())
        assert torch.equal(packed.positions(), mask.flatten().nonzero().squeeze(1))
    assert MaskPositions.of(sparse).far_at.tolist() == [2, 4]  # after the gaps 256 and 2487


def test_masked_state_step_decodes_stored_positions_without_searching_the_mask(monkeypatch):
    """The mask's positions are found once, when the optimizer is built: a step runs no `nonzero`."""
    _, _, opt = _lean_vs_dense(OptimizerSpec("adamw", 1e-2), lean=True, steps=1)

    def searched(*args, **kwargs):
        raise AssertionError("the forget step searched the mask for its positions")

    monkeypatch.setattr(torch.Tensor, "nonzero", searched)
    monkeypatch.setattr(torch, "nonzero", searched)
    for p in opt.forget_optimizer.params:
        p.grad = torch.ones_like(p)
    opt.forget_step()
