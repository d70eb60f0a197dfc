"""The sample store: same bytes for 1 and N processes, resume from finished shards, refusal of other settings."""

from __future__ import annotations

import pytest
import torch

from diffusion_unlearn.eval.sample_store import OneProcess, SamplePlan, SampleStore, select
from diffusion_unlearn.fileio import UserError


def fake_generate(labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """An image per index from its own generator, as the pipelines seed them."""
    return torch.stack([torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(int(i))) for i in indices])


def fake_features(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pool": images.flatten(1).float() / 255}


PLAN = SamplePlan.of({3: 7, 0: 5, 9: 4})


def _store(root, **record) -> SampleStore:
    return SampleStore(root, PLAN, {"model": "m", **record}, shard_size=3)


def test_one_and_two_processes_make_the_same_store(tmp_path):
    one = _store(tmp_path / "one")
    one.open(OneProcess())
    assert one.fill(OneProcess(), fake_generate, fake_features) == 16
    two = _store(tmp_path / "two")
    ranks = [OneProcess(r, 2, r == 0) for r in range(2)]
    two.open(ranks[0])
    made = [two.fill(r, fake_generate, fake_features) for r in ranks]
    assert made == [9, 7]  # shards 0, 2, 4 of 3 images and 1, 3, 5 (the last holds one image)
    a, b = one.read(), two.read()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["indices"], PLAN.indices) and a["images"].dtype == torch.uint8
    assert (select(a, [0])["labels"] == 0).all() and len(select(a, [0, 9])["labels"]) == 9


def test_a_killed_fill_resumes_from_its_finished_shards(tmp_path):
    calls = {"n": 0}

    def dies_after_two(labels, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return fake_generate(labels, indices)

    store = _store(tmp_path / "s")
    store.open(OneProcess())
    with pytest.raises(KeyboardInterrupt):
        store.fill(OneProcess(), dies_after_two, fake_features)
    assert not store.finished() and len(list(store.root.glob("shard-*.safetensors"))) == 2
    assert not list(store.root.glob("*.tmp*"))  # the interrupted shard left nothing behind
    with pytest.raises(UserError, match="lacks shards"):
        store.read()
    assert store.fill(OneProcess(), fake_generate, fake_features) == 10  # only the 4 missing shards
    fresh = _store(tmp_path / "fresh")
    fresh.open(OneProcess())
    fresh.fill(OneProcess(), fake_generate, fake_features)
    assert all(torch.equal(v, fresh.read()[k]) for k, v in store.read().items())


def test_a_store_made_with_other_settings_is_refused(tmp_path):
    _store(tmp_path / "s", sampler={"steps": 20}).open(OneProcess())
    with pytest.raises(UserError, match=r"sampler: \{'steps': 20\} there, \{'steps': 50\} now"):
        _store(tmp_path / "s", sampler={"steps": 50}).open(OneProcess())
    other_plan = SampleStore(tmp_path / "s", SamplePlan.of({3: 8}), {"model": "m", "sampler": {"steps": 20}}, 3)
    with pytest.raises(UserError, match="plan"):
        other_plan.open(OneProcess())
    _store(tmp_path / "s", sampler={"steps": 20}).open(OneProcess())  # the same settings: reused
