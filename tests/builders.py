"""Fixture builders shared by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from diffusion_unlearn.convert import CIFAR10_CLASSES


def write_cifar(folder, per_batch: int = 4, max_value: int = 256) -> None:
    """A CIFAR-10-format fixture: 5 data batches and a test batch of `per_batch` images, labels cycling 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, max_value, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i * per_batch + k) % 10 for k in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)


def ema_update_that_kills(kill_after: int):
    """`EMA.update` that raises KeyboardInterrupt after its `kill_after`-th call (a killed run), and the original."""
    from diffusion_unlearn.ema import EMA

    original, calls = EMA.update, [0]

    def killing_update(self):
        original(self)
        calls[0] += 1
        if calls[0] == kill_after:
            raise KeyboardInterrupt

    return killing_update, original


def killed_pretrain_resumes(monkeypatch, args: list[str], kill_after: int) -> None:
    """Run `pretrain` with `args` killed (KeyboardInterrupt) after its `kill_after`-th EMA update, check that it
    left a resumable state, then rerun it to the end."""
    from diffusion_unlearn.cli import main
    from diffusion_unlearn.ema import EMA

    killing, original = ema_update_that_kills(kill_after)
    monkeypatch.setattr(EMA, "update", killing)
    out = Path(args[args.index("--out") + 1])
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert (out / "training_state.pt").exists()
    monkeypatch.setattr(EMA, "update", original)
    assert main(args) == 0
