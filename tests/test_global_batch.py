"""Keyed per-sample draws (global_batch.py): a process's slice of the global batch draws exactly the rows the
whole batch draws, whatever the split; outside a keyed batch the global RNG is used as before."""

import torch

from diffusion_unlearn import global_batch
from diffusion_unlearn.diffusion import antithetic_timesteps
from diffusion_unlearn.global_batch import BatchKey, keyed
from diffusion_unlearn.methods.salun import pseudo_labels
from diffusion_unlearn.pipelines.backbone import drop_labels


def _draws(lo: int, hi: int) -> list[torch.Tensor]:
    """Every kind of keyed draw the loop makes, for rows [lo, hi) of a global batch of 8."""
    x = torch.zeros(hi - lo, 1, 4, 4)  # (b, C, H, W)
    labels = torch.full((hi - lo,), 3)  # (b,)
    dropout = global_batch.KeyedDropout(0.5).train()
    with keyed(BatchKey(seed=1, stream="forget", batch=4, size=8, lo=lo, hi=hi)):
        return [antithetic_timesteps(hi - lo, 1000), global_batch.randn_like(x, "noise"),
                global_batch.randn_like(x, "noise"),  # a second draw of a purpose is a new draw
                drop_labels(labels, 0.5, 10), pseudo_labels(labels, 10, "random"),
                global_batch.rand_like(x, "surrogate"), dropout(torch.ones(hi - lo, 6)),
                dropout(torch.ones(2 * (hi - lo), 6))]  # a guided pass: two stacked copies of the rows


def test_slices_draw_the_rows_of_the_global_batch():
    whole = _draws(0, 8)
    for split in ([0, 4, 8], [0, 2, 4, 6, 8]):
        parts = [_draws(lo, hi) for lo, hi in zip(split, split[1:])]
        for i, value in enumerate(whole[:-1]):
            assert torch.equal(torch.cat([p[i] for p in parts]), value), i
        stacked = torch.cat([p[-1].view(2, -1, 6) for p in parts], dim=1).view(16, 6)  # copies × samples
        assert torch.equal(stacked, whole[-1])
    t = whole[0]
    assert torch.equal(t[:3], 999 - t[5:8]) and torch.equal(t[5:8], 999 - t[:3])  # pairs span the slices
    assert not torch.equal(whole[1], whole[2])


def test_other_batches_draw_other_numbers_and_outside_draws_use_the_global_rng():
    x = torch.zeros(4, 3)
    with keyed(BatchKey(1, "forget", 0, 4, 0, 4)):
        a = global_batch.randn_like(x, "noise")
    with keyed(BatchKey(1, "forget", 1, 4, 0, 4)):
        b = global_batch.randn_like(x, "noise")
    with keyed(BatchKey(1, "retain", 0, 4, 0, 4)):
        c = global_batch.randn_like(x, "noise")
    assert not torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    expected = torch.randn_like(x)
    torch.manual_seed(7)
    assert torch.equal(global_batch.randn_like(x, "noise"), expected)
