"""The data layer: decoding any image mode, crops, sources, bad files, missing data, seeded batches."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_fmnist, write_image_tree
from PIL import Image

import ldae_cli.data.sources as sources_mod
from ldae_cli.data.pipeline import (
    BadImage,
    BadImageCounter,
    DataConfig,
    build_dataset,
    collate,
    decode_batch,
    load_image_file,
    make_loader,
    prepare,
    to_rgb,
    to_uint8,
    to_unit_range,
)
from ldae_cli.data.sources import open_source, resolve_path
from ldae_cli.errors import LdaeError
from ldae_cli.seeds import SeededSteps


def reopen(img: Image.Image, fmt: str) -> Image.Image:
    """Save and decode again, as a file on disk would be."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out


def as_array(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


# --- decoding every mode to RGB uint8 -------------------------------------------------------------


def test_grayscale_becomes_three_equal_channels():
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = as_array(prepare(reopen(Image.fromarray(arr, "L"), "PNG"), 8))
    assert out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_rgba_is_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red
    arr[0, :, 3] = 0  # row 0 fully transparent -> white
    arr[1, :, 3] = 255  # row 1 opaque -> the colour
    arr[2:, :, 3] = 128  # half transparent -> halfway to white
    out = as_array(prepare(reopen(Image.fromarray(arr, "RGBA"), "PNG"), 4))
    np.testing.assert_array_equal(out[0], np.full((4, 3), 255))
    np.testing.assert_array_equal(out[1], np.tile([200, 0, 0], (4, 1)))
    assert np.all(np.abs(out[2].astype(int) - [227, 127, 127]) <= 2)


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # palette entry 0 (red) is transparent
    img = reopen(img, "PNG")
    assert img.mode == "P" and "transparency" in img.info
    out = as_array(prepare(img, 4))
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent red shows the white background
    assert (out == 255).all(axis=-1).sum() == 15


def test_palette_without_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0] * 765)
    out = as_array(prepare(reopen(img, "PNG"), 4))
    assert (out == [10, 20, 30]).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    img = reopen(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt)  # pure red in CMYK
    assert img.mode == "CMYK"
    out = as_array(prepare(img, 8)).astype(int)
    assert np.all(np.abs(out - [255, 0, 0]) <= 3)


def test_16bit_png_is_scaled_not_clipped():
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2], arr[0, 3] = 65535, 32768, 257, 100
    img = reopen(Image.fromarray(arr), "PNG")
    assert img.mode.startswith("I;16") or img.mode == "I"
    out = as_array(prepare(img, 4))
    assert out[0, 0].tolist() == [255] * 3
    assert out[0, 1].tolist() == [128] * 3
    assert out[0, 2].tolist() == [1] * 3
    assert out[0, 3].tolist() == [0] * 3
    assert out[1:].max() == 0


def test_32bit_integer_and_float_images():
    arr = np.zeros((2, 2), np.int32)
    arr[0, 0], arr[0, 1] = 65535, 200
    out = np.array(to_rgb(Image.fromarray(arr, "I")))
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [1] * 3  # 16-bit range detected
    small = np.array([[0, 255]], np.int32)
    assert np.array(to_rgb(Image.fromarray(small, "I")))[0, 1].tolist() == [255] * 3  # 8-bit values in 'I'
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert np.array(to_rgb(Image.fromarray(unit, "F")))[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]


def test_exif_orientation_is_applied():
    arr = np.zeros((4, 8, 3), np.uint8)  # 8 wide, 4 high; left half red
    arr[:, :4, 0] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert out.size == (4, 8)


# --- crops and ranges ---------------------------------------------------------------------------


def test_center_crop_of_non_square_image():
    w, h = 60, 20
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :20] = [255, 0, 0]  # left third red
    arr[:, 20:40] = [0, 255, 0]  # middle third (the centre square) green
    arr[:, 40:] = [0, 0, 255]  # right third blue
    out = as_array(prepare(Image.fromarray(arr), 10)).astype(int)
    assert out.shape == (10, 10, 3)
    # the interior of the crop is pure green: neither side band made it in
    assert np.all(np.abs(out[:, 1:-1] - [0, 255, 0]) <= 2)
    tall = as_array(prepare(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))), 10)).astype(int)
    assert np.all(np.abs(tall[1:-1] - [0, 255, 0]) <= 2)


def test_resize_keeps_image_content_and_size_unchanged_is_identity():
    arr = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(as_array(prepare(Image.fromarray(arr), 12)), arr)
    flat = np.full((40, 30, 3), 77, np.uint8)
    assert (as_array(prepare(Image.fromarray(flat), 16)) == 77).all()


def test_unit_range_and_back():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    f = to_unit_range(x)
    assert f.dtype == torch.float32 and f.min() == -1.0 and f.max() == 1.0
    assert abs(float(f[0, 0, 8, 0]) - (128 / 127.5 - 1)) < 1e-6
    assert torch.equal(to_uint8(f), x)
    assert x.dtype == torch.uint8 and x.max() == 255  # input untouched


def test_random_resized_crop_is_deterministic_per_seed():
    arr = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    a = prepare(img, 16, "random-resized", (0.2, 1.0), hflip=True, aug_seed=1234)
    b = prepare(img, 16, "random-resized", (0.2, 1.0), hflip=True, aug_seed=1234)
    assert torch.equal(a, b)
    others = [prepare(img, 16, "random-resized", (0.2, 1.0), hflip=True, aug_seed=s) for s in range(1, 9)]
    assert sum(not torch.equal(a, o) for o in others) >= 7
    assert all(o.shape == (3, 16, 16) for o in others)


def test_random_resized_crops_same_with_and_without_workers(image_tree):
    cfg = DataConfig(source="imagefolder", path=str(image_tree), image_size=8, crop="random-resized", hflip=True)
    ds = build_dataset(cfg, "train")
    assert ds.cached is None and not ds.deterministic
    keys = [list(k) for k in SeededSteps(len(ds), 4, seed=5, total_steps=3)]
    one = [b.images for b in make_loader(ds, keys, num_workers=0)]
    two = [b.images for b in make_loader(ds, keys, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert len(one) == 3


# --- unreadable files ---------------------------------------------------------------------------


def test_load_image_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"definitely not a jpeg" * 10)
    with pytest.raises(LdaeError) as info:
        load_image_file(bad, 8)
    assert str(bad) in str(info.value) and "cannot read image" in str(info.value)
    with pytest.raises(LdaeError) as info:
        load_image_file(tmp_path / "missing.png", 8)
    assert "not found" in str(info.value)


def test_bad_image_with_policy_error_names_the_file(image_tree):
    bad = image_tree / "train" / "dog" / "x.jpg"
    bad.write_bytes(b"\xff\xd8garbage" * 20)
    for cache in ("auto", "never"):
        cfg = DataConfig(source="imagefolder", path=str(image_tree), image_size=8, cache=cache)
        with pytest.raises(LdaeError) as info:
            ds = build_dataset(cfg, "train")
            BadImageCounter("error").check(collate([ds[i] for i in range(len(ds))]))
        msg = str(info.value)
        assert str(bad) in msg and "on_bad_image=skip" in msg and "\n" not in msg


def test_bad_image_with_policy_skip_is_counted_and_skipped(image_tree):
    bad = image_tree / "train" / "dog" / "x.jpg"
    bad.write_bytes(b"garbage" * 20)
    good_count = 12
    # uncached: the batch carries the bad item, the counter drops it
    cfg = DataConfig(source="imagefolder", path=str(image_tree), image_size=8, cache="never", on_bad_image="skip")
    ds = build_dataset(cfg, "train")
    assert len(ds) == good_count + 1
    counter = BadImageCounter(cfg.on_bad_image)
    with pytest.warns(UserWarning, match="x.jpg"):
        batch = counter.check(collate([ds[i] for i in range(len(ds))]))
    assert counter.skipped == 1 and batch.images.shape == (good_count, 3, 8, 8)
    assert [b.name for b in batch.bad] == [str(bad)]
    # cached (the default for center crops): the bad image is dropped and the rest stays aligned
    cfg = DataConfig(source="imagefolder", path=str(image_tree), image_size=8, on_bad_image="skip")
    with pytest.warns(UserWarning, match="x.jpg"):
        cached = build_dataset(cfg, "train")
    assert cached.cached is not None and len(cached) == good_count and cached.skipped == 1
    assert str(bad) not in [cached.name(i) for i in range(len(cached))]
    uncached = [ds[i] for i in range(len(ds)) if not isinstance(ds[i], BadImage)]
    for i, (img, label) in enumerate(uncached):
        got_img, got_label = cached[i]
        assert torch.equal(got_img, img) and got_label == label


def test_bad_image_counter_error_policy_raises():
    batch = collate([(torch.zeros(3, 2, 2, dtype=torch.uint8), 0), BadImage("a.png", "broken")])
    with pytest.raises(LdaeError, match="a.png"):
        BadImageCounter("error").check(batch)


def test_gpu_decoding_passes_a_micro_batch_of_only_skipped_files_through_empty():
    """data.decode=gpu with on_bad_image=skip: a micro-batch whose every file is unreadable is an empty batch, as
    with PIL."""
    batch = BadImageCounter("skip").check(collate([BadImage("a.jpg", "gone"), BadImage("b.jpg", "gone")]))
    decoded = decode_batch(batch, 8, torch.device("cpu"))
    assert decoded.images.shape[0] == 0 and decoded.labels.shape[0] == 0 and len(decoded.bad) == 2


# --- missing data -------------------------------------------------------------------------------


def test_missing_data_path_says_where_and_how(tmp_path):
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "nowhere"))
    with pytest.raises(LdaeError) as info:
        open_source(cfg, "train")
    msg = str(info.value)
    assert "nowhere" in msg and "does not exist" in msg and "<split>/<class>" in msg


def test_missing_fashion_mnist_lists_places_and_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LDAE_DATA", str(tmp_path / "env-data"))
    monkeypatch.setattr(sources_mod, "CACHE_HOME", tmp_path / "cache")
    monkeypatch.setattr(sources_mod, "FMNIST_DEBIAN", tmp_path / "usr-share" / "fashion-mnist")
    with pytest.raises(LdaeError) as info:
        resolve_path(DataConfig(source="fashion-mnist"))
    msg = str(info.value)
    assert str(tmp_path / "env-data" / "fashion-mnist") in msg
    assert str(tmp_path / "usr-share" / "fashion-mnist") in msg
    assert str(tmp_path / "cache" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg


def test_fashion_mnist_found_through_LDAE_DATA(tmp_path, monkeypatch):
    arrays = write_fmnist(tmp_path / "env-data" / "fashion-mnist")
    monkeypatch.setenv("LDAE_DATA", str(tmp_path / "env-data"))
    src = open_source(DataConfig(source="fashion-mnist"), "train")
    assert len(src) == len(arrays["train"][0])


def test_missing_cifar10_and_imagefolder_without_path(tmp_path, monkeypatch):
    monkeypatch.delenv("LDAE_DATA", raising=False)
    monkeypatch.setattr(sources_mod, "CACHE_HOME", tmp_path / "cache")
    monkeypatch.setattr(sources_mod, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(LdaeError) as info:
        resolve_path(DataConfig(source="cifar10"))
    assert "cifar10 dataset not found" in str(info.value) and str(tmp_path / "cache") in str(info.value)
    with pytest.raises(LdaeError, match="needs data.path"):
        resolve_path(DataConfig(source="imagefolder"))


def test_imagefolder_without_split_folder(image_tree):
    with pytest.raises(LdaeError) as info:
        open_source(DataConfig(source="imagefolder", path=str(image_tree), train_split="training"), "train")
    assert "'training'" in str(info.value) and "<split>/<class>/<image>" in str(info.value)


# --- sources ------------------------------------------------------------------------------------


def _tar(root: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=arcname)
    return archive


def test_imagefolder_folder_and_tar_give_identical_images_and_labels(tmp_path):
    # class names whose order differs between sorting names and sorting "name/file" paths
    root = write_image_tree(
        tmp_path / "data" / "ds", classes=("a", "a-b", "a_c", "B"), per_class=3, splits=("train", "val")
    )
    archive = _tar(tmp_path / "data", tmp_path / "ds.tar.gz", "top")
    for split, name in (("train", "train"), ("eval", "val")):
        cfg_dir = DataConfig(source="imagefolder", path=str(root), image_size=8)
        cfg_tar = DataConfig(source="imagefolder", path=str(archive), image_size=8)
        a, b = build_dataset(cfg_dir, split), build_dataset(cfg_tar, split)
        assert a.classes == b.classes == ["B", "a", "a-b", "a_c"]
        assert len(a) == len(b) == 12
        for i in range(len(a)):
            assert Path(a.name(i)).relative_to(root).as_posix() == b.name(i).split(":top/ds/", 1)[1]
            ia, la = a[i]
            ib, lb = b[i]
            assert torch.equal(ia, ib) and la == lb
        assert a.labels_tensor().tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
        assert all(f"/{name}/" in a.name(i) for i in range(len(a)))


def test_imagefolder_split_found_one_level_down_and_plain_images(tmp_path):
    write_image_tree(tmp_path / "outer" / "cifar", per_class=2, splits=("train", "test"))
    cfg = DataConfig(source="cifar10", path=str(tmp_path / "outer"), image_size=8)
    assert len(build_dataset(cfg, "eval")) == 6 and cfg.split_name("eval") == "test"
    plain = DataConfig(source="images", path=str(tmp_path / "outer"), image_size=8)
    ds = build_dataset(plain, "train")
    assert len(ds) == 12 and ds.label(0) == -1


def test_damaged_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"not a tar archive" * 100))
    with pytest.raises(LdaeError) as info:
        open_source(DataConfig(source="imagefolder", path=str(bad)), "train")
    assert str(bad) in str(info.value)


def test_fashion_mnist_idx_parsing(fmnist_dir):
    root, arrays = fmnist_dir
    for split, key in (("train", "train"), ("eval", "test")):
        images, labels = arrays[key]
        src = open_source(DataConfig(source="fashion-mnist", path=str(root)), split)
        assert len(src) == len(images) and src.labels == labels.tolist()
        assert src.classes[0] == "T-shirt/top" and len(src.classes) == 10
        ds = build_dataset(DataConfig(source="fashion-mnist", path=str(root), image_size=28), split)
        for i in range(len(ds)):
            img, label = ds[i]
            assert label == labels[i]
            for c in range(3):
                np.testing.assert_array_equal(img[c].numpy(), images[i])
    ds32 = build_dataset(DataConfig(source="fashion-mnist", path=str(root), image_size=32), "train")
    assert ds32[0][0].shape == (3, 32, 32)


def test_fashion_mnist_uncompressed_idx(tmp_path):
    arrays = write_fmnist(tmp_path / "raw", gz=False)
    src = open_source(DataConfig(source="fashion-mnist", path=str(tmp_path / "raw")), "eval")
    np.testing.assert_array_equal(src.images, arrays["test"][0])


def test_fashion_mnist_damaged_or_missing_files(fmnist_dir):
    root, _ = fmnist_dir
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(LdaeError, match="missing t10k-labels-idx1-ubyte"):
        open_source(DataConfig(source="fashion-mnist", path=str(root)), "eval")
    with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])  # truncated
    with pytest.raises(LdaeError) as info:
        open_source(DataConfig(source="fashion-mnist", path=str(root)), "train")
    assert "train-images-idx3-ubyte.gz" in str(info.value) and "IDX" in str(info.value)
    with pytest.raises(LdaeError, match="splits 'train' and 'test'"):
        open_source(DataConfig(source="fashion-mnist", path=str(root), eval_split="val"), "eval")


def test_limit_takes_a_seeded_subset(fmnist_dir):
    root, arrays = fmnist_dir
    cfg = DataConfig(source="fashion-mnist", path=str(root), image_size=28, limit=5)
    a, b = build_dataset(cfg, "train", seed=1), build_dataset(cfg, "train", seed=1)
    assert len(a) == 5 and a.subset == b.subset and a.subset == sorted(a.subset)
    for i in range(5):
        np.testing.assert_array_equal(a[i][0][0].numpy(), arrays["train"][0][a.subset[i]])
        assert a[i][1] == arrays["train"][1][a.subset[i]]


# --- seeded global batches ----------------------------------------------------------------------


def _steps(n, batch, seed, world=1, accum=1, start=0, total=12):
    """{step: [rank0 micro-batches..., rank1 micro-batches...]} as flat lists of (index, aug_seed)."""
    out = {}
    for rank in range(world):
        it = iter(SeededSteps(n, batch, seed, rank, world, accum, start_step=start, total_steps=total))
        for step in range(start, total):
            micro = [next(it) for _ in range(accum)]
            assert all(len(m) == batch // world // accum for m in micro)
            out.setdefault(step, []).extend(k for m in micro for k in m)
    return out


def test_global_batch_is_the_same_for_any_world_size_and_accumulation():
    ref = _steps(50, 8, seed=7)
    for world, accum in ((2, 1), (1, 2), (2, 2), (4, 2), (8, 1)):
        assert _steps(50, 8, seed=7, world=world, accum=accum) == ref
    assert _steps(50, 8, seed=8) != ref


def test_epochs_are_permutations_and_aug_seeds_change_per_epoch():
    n, batch = 48, 8
    steps = _steps(n, batch, seed=0, total=12)  # 6 steps per epoch, two epochs
    epoch0 = [k for s in range(6) for k in steps[s]]
    epoch1 = [k for s in range(6, 12) for k in steps[s]]
    assert sorted(i for i, _ in epoch0) == list(range(n)) == sorted(i for i, _ in epoch1)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    seeds0 = dict(epoch0)
    assert all(seeds0[i] != s for i, s in epoch1)  # a new crop for each image every epoch


def test_resuming_at_start_step_gives_the_same_batches():
    full = list(SeededSteps(50, 8, seed=3, pieces=2, total_steps=15))
    resumed = list(SeededSteps(50, 8, seed=3, pieces=2, start_step=9, total_steps=15))
    assert resumed == full[9 * 2 :]
    assert len(SeededSteps(50, 8, seed=3, pieces=2, start_step=9, total_steps=15)) == 12


def test_step_batches_reject_bad_sizes():
    with pytest.raises(LdaeError, match="not divisible"):
        SeededSteps(100, 10, 0, world=4)
    with pytest.raises(LdaeError, match="fewer than one global batch"):
        SeededSteps(5, 8, 0)


def test_loader_over_step_batches_yields_the_indexed_images(fmnist_dir):
    root, arrays = fmnist_dir
    ds = build_dataset(DataConfig(source="fashion-mnist", path=str(root), image_size=28), "train")
    assert ds.cached is not None  # center crops are decoded once
    keys = list(SeededSteps(len(ds), 4, seed=0, total_steps=3))
    for k, batch in zip(keys, make_loader(ds, keys, num_workers=0)):
        idx = [i for i, _ in k]
        np.testing.assert_array_equal(batch.images[:, 0].numpy(), arrays["train"][0][idx])
        assert batch.labels.tolist() == arrays["train"][1][idx].tolist()


def test_a_cached_dataset_flips_exactly_like_an_uncached_one(image_tree):
    """The cache holds unflipped images; each read flips by its own sample seed (it once flipped the cache too)."""
    cached = build_dataset(
        DataConfig(source="imagefolder", path=str(image_tree), image_size=8, hflip=True, num_workers=0, cache="always"),
        "train",
    )
    fresh = build_dataset(
        DataConfig(source="imagefolder", path=str(image_tree), image_size=8, hflip=True, num_workers=0, cache="never"),
        "train",
    )
    assert cached.cached is not None and fresh.cached is None
    for key in [(i, seed) for i in range(len(fresh)) for seed in (0, 1, 2, 3)]:
        assert torch.equal(cached[key][0], fresh[key][0]), key


# --- one image is no training data ----------------------------------------------------------------

SINGLE_IMAGE = {  # a training stage given --data IMAGE, where `data.source: auto` looks at what --data is
    "pretrain": lambda world: ["pretrain", "--config", "final.yaml"],
    "fit-pca": lambda world: ["fit-pca"],
    "probe": lambda world: ["probe", "--ckpt", str(world.ckpt)],
    "finetune": lambda world: ["finetune", "--ckpt", str(world.ckpt)],
    "train-tokenizer": lambda world: ["train-tokenizer", "--config", "tokenizer/conv-vae"],
}


@pytest.mark.parametrize("stage", SINGLE_IMAGE)
def test_one_image_as_training_data_is_refused_with_the_fix(stage, world, run_main, tmp_path):
    from helpers import one_line, snapshot, unchanged

    image = tmp_path / "img.png"
    image.write_bytes((world.images / "train" / "a" / "0.png").read_bytes())
    before = snapshot(tmp_path, world.root)
    res = run_main(*SINGLE_IMAGE[stage](world), "--data", str(image))
    one_line(
        res,
        1,
        f"`{image}` is a single image; --data takes a folder of images, an image tree or an archive "
        "(.tar/.tar.gz): put it in a folder",
    )
    unchanged(before)
    assert set(snapshot(tmp_path, world.root)) == set(before)  # nothing written either


def test_denoise_still_takes_one_image(world, run_main, tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes((world.images / "val" / "a" / "0.png").read_bytes())
    res = run_main(
        "denoise", str(image), "--ckpt", str(world.ckpt), "--out", str(tmp_path / "panel.png"), "--device", "cpu"
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "panel.png").stat().st_size > 0


def test_every_configurable_source_has_one_reader_and_an_unknown_one_is_named():
    import typing

    from ldae_cli.settings.training import Source

    assert set(typing.get_args(Source)) - {"auto"} == set(sources_mod.SOURCES)  # a new kind: one reader, one line
    with pytest.raises(LdaeError, match=r"^data.source 'mnist': .*\(fashion-mnist, cifar10, imagefolder, images\)$"):
        open_source(DataConfig(source="mnist", path="."), "train")
