"""The .npz files of this field: DiT/ADM sample batches and reference statistics, ours and ADM's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_unlearn.eval.npz_files import (read_reference_statistics, read_samples_npz, write_reference_statistics,
                                              write_samples_npz)
from diffusion_unlearn.fileio import UserError


def test_sample_batch_round_trip_in_adm_layout(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    labels = torch.tensor([0, 3, 3, 7, 9])
    write_samples_npz(tmp_path / "s.npz", images, labels)
    raw = np.load(tmp_path / "s.npz")
    assert raw["arr_0"].shape == (5, 4, 6, 3) and raw["arr_0"].dtype == np.uint8  # N, H, W, C as ADM reads it
    assert np.array_equal(raw["arr_0"][2, 1, 5], images[2, :, 1, 5].numpy())
    back, back_labels = read_samples_npz(tmp_path / "s.npz")
    assert torch.equal(back, images) and torch.equal(back_labels, labels)


def test_reference_statistics_ours_and_adms(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=8), rng.normal(size=(8, 8))
    write_reference_statistics(tmp_path / "ours.npz", mu, a @ a.T, 123, {"extractor": "x", "weights_sha256": "ab"})
    stats, about = read_reference_statistics(tmp_path / "ours.npz", dim=8)
    assert np.array_equal(stats["mu"], mu) and about["count"] == 123 and about["extractor"] == "x"
    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=(a @ a.T).astype(np.float32),
             mu_s=np.zeros(3), sigma_s=np.eye(3), arr_0=np.zeros((4, 2, 2, 3), np.uint8))  # ADM's layout
    stats, about = read_reference_statistics(tmp_path / "adm.npz")
    assert stats["mu"].dtype == np.float64 and about["kind"].startswith("ADM") and about["count"] == 4
    with pytest.raises(UserError, match="8-d statistics, the feature extractor gives 2048-d"):
        read_reference_statistics(tmp_path / "adm.npz", dim=2048)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 2, 2, 3), np.uint8))
    with pytest.raises(UserError, match="no FID reference statistics"):
        read_reference_statistics(tmp_path / "samples.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        read_reference_statistics(tmp_path / "junk.npz")
