"""Tests for diffusion_unlearn.data: digits, CIFAR-10 reader, image folders, class splits, BatchStream."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_unlearn.data import BatchStream, ImageDataset, forget_retain_split, load_dataset
from diffusion_unlearn.fileio import UserError

from builders import write_cifar

# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797
    assert (train.channels, train.image_size, train.num_classes) == (1, 8, 10)
    assert train.class_names == [str(k) for k in range(10)]
    x, y = train.get_batch(torch.arange(len(train)))
    assert x.shape == (len(train), 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(y, train.targets) and train.targets.shape == (len(train),)
    assert set(test.targets.tolist()) == set(range(10))  # stratified: every class in test
    counts = torch.bincount(test.targets, minlength=10).float()
    assert counts.min() >= 0.8 * counts.max()  # stratified: roughly 36 per class
    again = load_dataset("digits", split="test")
    assert torch.equal(again.get_batch(torch.arange(len(again)))[0], test.get_batch(torch.arange(len(test)))[0])
    assert torch.equal(again.targets, test.targets)
    xi, yi = train[5]
    assert torch.equal(xi, x[5]) and yi == int(y[5]) and isinstance(yi, int)


def test_digits_subset_and_with_classes_keep_labels():
    ds = load_dataset("digits")
    sub = ds.with_classes([3, 7])
    assert set(sub.targets.tolist()) == {3, 7}  # not renumbered
    assert len(sub) == int(((ds.targets == 3) | (ds.targets == 7)).sum())
    assert (sub.name, sub.num_classes, sub.transform_id) == (ds.name, ds.num_classes, ds.transform_id)
    pos = (ds.targets == 7).nonzero().squeeze(1)
    x_full, _ = ds.get_batch(pos)
    x_sub, y_sub = sub.get_batch((sub.targets == 7).nonzero().squeeze(1))
    assert torch.equal(x_sub, x_full) and (y_sub == 7).all()
    sub2 = sub.subset([0, 2])
    assert torch.equal(sub2.get_batch(torch.arange(2))[0], sub.get_batch(torch.tensor([0, 2]))[0])
    with pytest.raises(UserError):
        ds.with_classes([10])


def test_digits_bad_image_size():
    with pytest.raises(UserError, match="image-size 8"):
        load_dataset("digits", image_size=16)
    with pytest.raises(UserError):
        load_dataset("mnist")


# ----------------------------------------------------------------------------- CIFAR-10


def _set_pixel(path, image, channel, row, col, value):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"data"][image, channel * 1024 + row * 32 + col] = value
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def test_cifar_decodes_pixels_and_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, per_batch=2, max_value=100)
    _set_pixel(folder / "data_batch_2", image=1, channel=1, row=5, col=7, value=255)  # G, row 5, col 7
    for root in (tmp_path, folder):  # parent of cifar-10-batches-py/ or the folder itself
        ds = load_dataset("cifar10", root=str(root))
        assert len(ds) == 10 and (ds.channels, ds.image_size, ds.num_classes) == (3, 32, 10)
        assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
        assert ds.targets.tolist() == list(range(10))
        x, y = ds[3]  # data_batch_2, image 1
        assert x.shape == (3, 32, 32) and y == 3
        assert x[1, 5, 7] == 1  # 255 -> 1, only in G at (5, 7)
        assert x[0, 5, 7] < 1 and x[2, 5, 7] < 1 and x[1, 7, 5] < 1
        assert (x[1] == 1).sum() == 1
    test = load_dataset("cifar10", root=str(tmp_path), split="test")
    assert len(test) == 2 and test.targets.tolist() == [0, 1]
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    x, _ = test.get_batch(torch.tensor([0, 1]))
    expected = torch.from_numpy(raw).reshape(2, 3, 32, 32).float() / 255 * 2 - 1
    assert torch.equal(x, expected)
    with pytest.raises(UserError):
        load_dataset("cifar10", root=str(tmp_path), image_size=64)


def test_cifar_reads_old_numpy_module_name(tmp_path):
    """Official batches name numpy.core.multiarray._reconstruct (numpy 1.x), which must be accepted."""
    write_cifar(tmp_path, per_batch=2, max_value=100)
    path = tmp_path / "test_batch"
    raw = path.read_bytes()
    old = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(old)
    ds = load_dataset("cifar10", root=str(tmp_path), split="test")
    assert len(ds) == 2


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_cifar_refuses_forbidden_global(tmp_path):
    write_cifar(tmp_path, per_batch=2, max_value=100)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UserError, match="forbidden global os.makedirs"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_refuses_corrupt_official_size_file(tmp_path):
    write_cifar(tmp_path, per_batch=2, max_value=100)
    with open(tmp_path / "data_batch_1", "wb") as f:
        f.truncate(31035704)  # sparse file of the official size, wrong MD5
    with pytest.raises(UserError, match="corrupt .MD5 mismatch"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar_missing_folder_explains_fix(tmp_path):
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*--data-root"):
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="--data-root"):
        load_dataset("cifar10")
    write_cifar(tmp_path, per_batch=2, max_value=100)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(UserError, match="data_batch_4"):
        load_dataset("cifar10", root=str(tmp_path))


# ----------------------------------------------------------------------------- image folders


def _png(path, size, value, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, value, value)
    Image.new(mode, size, fill).save(path)


def test_imagefolder_labels_crop_and_split(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "zebra" / "a.png", (40, 50), 10)
        _png(tmp_path / split / "apple" / "b.png", (50, 40), 20)
        _png(tmp_path / split / "apple" / "c.png", (40, 40), 30)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", root=str(tmp_path), image_size=32)
    assert ds.class_names == ["apple", "zebra"]
    for k, name in enumerate(["c", "a", "f", "b", "e", "d"]):  # created out of order
        _png(tmp_path / "many" / name / f"{k}.png", (8, 8), k)
    many = load_dataset("imagefolder", root=str(tmp_path / "many"))
    assert many.class_names == list("abcdef")
    assert [many[i][1] for i in range(6)] == list(range(6))
    assert [round((many[i][0][0, 0, 0].item() + 1) / 2 * 255) for i in range(6)] == [1, 3, 0, 5, 4, 2]
    assert ds.targets.tolist() == [0, 0, 1]
    assert (ds.channels, ds.image_size, ds.num_classes) == (3, 32, 2)
    x, y = ds.get_batch(torch.arange(3))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 0, 1]
    assert torch.allclose(x[2], torch.full((3, 32, 32), 10 / 255 * 2 - 1))
    assert "32" in ds.transform_id
    assert len(load_dataset("imagefolder", root=str(tmp_path), split="test", image_size=32)) == 3
    with pytest.raises(UserError, match="val"):
        load_dataset("imagefolder", root=str(tmp_path), split="val", image_size=32)


def test_imagefolder_center_crop_and_grayscale(tmp_path):
    im = Image.new("L", (64, 32), 0)  # shorter side already 32: the crop alone keeps the middle 32 columns
    im.paste(200, (16, 0, 48, 32))
    (tmp_path / "only").mkdir()
    im.save(tmp_path / "only" / "a.png")
    _png(tmp_path / "only" / "b.png", (32, 32), 50, mode="L")
    ds = load_dataset("imagefolder", root=str(tmp_path), image_size=32)
    assert ds.channels == 1 and ds.transform_id != load_dataset("digits").transform_id
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and y == 0
    assert torch.allclose(x, torch.full((1, 32, 32), 200 / 255 * 2 - 1))
    with pytest.raises(UserError, match="image-size"):
        load_dataset("imagefolder", root=str(tmp_path))  # first image 64x32 is not square


def test_imagefolder_size_from_square_images_and_errors(tmp_path):
    _png(tmp_path / "a" / "x.png", (16, 16), 0)
    ds = load_dataset("imagefolder", root=str(tmp_path))
    assert ds.image_size == 16 and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(UserError, match="not found"):
        load_dataset("imagefolder", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_dataset("imagefolder", root=str(tmp_path))
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError):
        load_dataset("imagefolder", root=str(tmp_path / "bare"))


# ----------------------------------------------------------------------------- class splits


def test_forget_retain_split():
    ds = load_dataset("digits")
    forget, retain = forget_retain_split(ds, 4)
    assert (forget.targets == 4).all() and (retain.targets != 4).all()
    assert len(forget) + len(retain) == len(ds) and len(forget) == int((ds.targets == 4).sum())
    xf, _ = forget.get_batch(torch.arange(len(forget)))
    xr, _ = retain.get_batch(torch.arange(len(retain)))
    xa, _ = ds.get_batch(torch.arange(len(ds)))
    assert torch.equal(torch.cat([xf, xr]).sum(0), xa.sum(0))  # covering, images intact
    assert retain.num_classes == 10
    for bad in (-1, 10):
        with pytest.raises(UserError, match="0..9"):
            forget_retain_split(ds, bad)


# ----------------------------------------------------------------------------- BatchStream


def _indexed(n):
    """Toy dataset whose image i is the row [i, 200]: the index survives a horizontal flip."""
    pixels = torch.tensor([[i, 200] for i in range(n)], dtype=torch.uint8).reshape(n, 1, 1, 2)
    return ImageDataset(name="toy", split="train", root=None, class_names=["a", "b"], channels=1, image_size=2,
                        transform_id="toy", targets=torch.arange(n) % 2, pixels=pixels)


def _index_and_flip(x):
    v = torch.round((x[:, 0, 0] + 1) / 2 * 255).long()  # (B, 2)
    return v.min(1).values, v[:, 0] == 200


def test_batchstream_exact_batches_and_epoch_coverage():
    ds = _indexed(23)
    stream = BatchStream(ds, batch_size=10, seed=0)
    seen = []
    for _ in range(7):  # 70 items = 3 epochs + 1
        x, y = stream.next()
        assert x.shape == (10, 1, 1, 2) and y.shape == (10,)
        idx, _ = _index_and_flip(x)
        assert torch.equal(y, idx % 2)
        seen += idx.tolist()
    for e in range(3):
        assert sorted(seen[23 * e:23 * (e + 1)]) == list(range(23))
    assert seen[:23] != seen[23:46]  # reshuffled each epoch
    assert stream.epoch == 3
    tiny = BatchStream(_indexed(3), batch_size=8, seed=1)  # smaller than one batch
    x, _ = next(iter(tiny))
    assert x.shape[0] == 8


def test_batchstream_hflip():
    stream = BatchStream(_indexed(50), batch_size=50, seed=0, hflip=True)
    flips = [_index_and_flip(stream.next()[0])[1] for _ in range(2)]
    for f in flips:
        assert 0 < int(f.sum()) < 50
    assert not torch.equal(flips[0], flips[1])  # fresh every epoch
    plain = BatchStream(_indexed(50), batch_size=50, seed=0)
    assert not _index_and_flip(plain.next()[0])[1].any()


@pytest.mark.parametrize("hflip", [False, True])
def test_batchstream_resume_bitwise(hflip):
    ds = load_dataset("digits").subset(torch.arange(45))
    a = BatchStream(ds, batch_size=16, seed=3, hflip=hflip)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = BatchStream(ds, batch_size=16, seed=3, hflip=hflip)
    b.load_state_dict(pickle.loads(pickle.dumps(state)))
    for xe, ye in expected:
        x, y = b.next()
        assert torch.equal(x, xe) and torch.equal(y, ye)
    fresh = BatchStream(ds, batch_size=16, seed=3, hflip=hflip)
    assert not torch.equal(fresh.next()[0], expected[0][0])  # the state, not the seed, made them equal
    with pytest.raises(UserError):
        BatchStream(ds.subset(torch.arange(10)), batch_size=4, seed=0).load_state_dict(state)


@pytest.mark.parametrize("hflip", [False, True])
def test_batchstream_slices_of_the_global_batch_do_not_depend_on_the_process_count(hflip):
    """Process r of N takes rows [rB/N, (r+1)B/N) of the same global batch, flips included, and its key names
    the global batch; a batch that N does not divide is refused."""
    ds = _indexed(23)
    whole = BatchStream(ds, batch_size=8, seed=5, hflip=hflip)
    halves = [BatchStream(ds, batch_size=8, seed=5, hflip=hflip, rank=r, world=2) for r in range(2)]
    for _ in range(7):  # crosses epoch ends
        x, y = whole.next()
        parts = [h.next() for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert (halves[1].key.lo, halves[1].key.hi, halves[1].key.size) == (4, 8, 8)
        assert halves[1].key.batch == whole.key.batch
    with pytest.raises(UserError, match="equal slices"):
        BatchStream(ds, batch_size=7, seed=0, world=2)
