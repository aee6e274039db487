"""Prepared datasets: the same training as from the source folder bit for bit, exact resume on them, ranks that
read disjoint images, byte-identical preparations, an interrupted preparation that continues."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import tiny_overrides, write_pattern_tree

from ldae_cli.config import load_config
from ldae_cli.data import prepared
from ldae_cli.data.pipeline import DataConfig, build_dataset, make_loader
from ldae_cli.data.sources import PreparedSource
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.seeds import SeededSteps

TOKENS = {"tokenizer.patch": 4, "tokenizer.dim": 8, "optim.epochs": 3, "optim.ema": 0.9}


def prepare(src, out, run_main, *extra):
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(src),
        "--image-size",
        "32",
        "--out",
        str(out),
        "--set",
        "data.num_workers=0",
        "--set",
        "shard_mb=0.01",
        *extra,
    )  # 3 images a shard
    assert res.returncode == 0, res.stderr
    return out


def tree_bytes(root) -> dict:
    """Every file's sha256 but ldae's bookkeeping (the lock, and the marker whose run id is each preparation's own)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".ldae.lock", ".ldae-run.json")
    }


def pretrain(run_main, data, out, **extra):
    from ldae_cli.stages import pretrain as stage

    online = {"online_probe.per_class": 1, "online_probe.max_share": 1}  # on for 8 images per class
    cfg = load_config(stage.PretrainConfig, "final.yaml", tiny_overrides(data, out, **TOKENS, **online, **extra))
    return stage.run(cfg, out.name)


def test_training_on_a_prepared_dataset_equals_training_on_its_source(pattern_tree, run_main, tmp_path):
    ready = prepare(pattern_tree, tmp_path / "ready", run_main)
    meta = json.loads((ready / "prepared.json").read_text())
    assert meta["splits"]["train"]["images"] == 16 and len(meta["splits"]["train"]["shards"]) == 6
    a = load_checkpoint(pretrain(run_main, pattern_tree, tmp_path / "folder"))
    b = load_checkpoint(pretrain(run_main, ready, tmp_path / "prepared"))
    for section in ("model", "ema", "optim", "tokenizer"):
        sa, sb = a.section(section), b.section(section)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), section
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [r.get("loss") for r in lines("folder")] == [r.get("loss") for r in lines("prepared")]
    assert [r.get("online_knn_top1") for r in lines("folder")] == [r.get("online_knn_top1") for r in lines("prepared")]


def test_resume_on_a_prepared_dataset_is_exact(pattern_tree, run_main, tmp_path):
    ready = prepare(pattern_tree, tmp_path / "ready", run_main)
    whole = load_checkpoint(pretrain(run_main, ready, tmp_path / "whole"))
    pretrain(run_main, ready, tmp_path / "cut", **{"run.stop_after_steps": 2})
    assert run_main("pretrain", "--resume", str(tmp_path / "cut")).returncode == 0
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert cut.extra["step"] == whole.extra["step"] == 6
    assert all(torch.equal(whole.tensors[k], cut.tensors[k]) for k in whole.tensors if not k.startswith("tokenizer"))


def test_two_ranks_read_disjoint_images(pattern_tree, run_main, tmp_path):
    ready = prepare(pattern_tree, tmp_path / "ready", run_main)
    cfg = DataConfig(source="imagefolder", path=str(ready), num_workers=0)
    touched = {}
    for rank in (0, 1):
        ds = build_dataset(cfg, "train")
        seen = touched.setdefault(rank, [])
        read = ds.source.array
        ds.source.array = lambda i, read=read, seen=seen: seen.append(i) or read(i)
        for _ in make_loader(ds, SeededSteps(len(ds), 8, 0, rank, 2, total_steps=2), 0):
            pass
    assert len(touched[0]) == len(touched[1]) == 8 and not set(touched[0]) & set(touched[1])
    assert sorted(touched[0] + touched[1]) == list(range(16))  # two steps of 8: one epoch, split by rank


def test_preparing_twice_gives_the_same_bytes_and_an_interrupted_one_continues(
    pattern_tree, run_main, tmp_path, monkeypatch
):
    first = tree_bytes(prepare(pattern_tree, tmp_path / "a", run_main))
    assert tree_bytes(prepare(pattern_tree, tmp_path / "b", run_main)) == first
    written, real = [], prepared.write_shard

    def dies_at_the_third(dataset, chunk, folder, k, bad, workers):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(k)
        real(dataset, chunk, folder, k, bad, workers)

    monkeypatch.setattr(prepared, "write_shard", dies_at_the_third)
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(pattern_tree),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "c"),
        "--set",
        "data.num_workers=0",
        "--set",
        "shard_mb=0.01",
    )
    assert res.returncode == 130 and written == [0, 1]
    assert "interrupted; kept: shards 1-2 of 6 of the 'train' split" in res.stderr
    with pytest.raises(LdaeError, match="interrupted; run the same `ldae prepare-data` command again"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "c")), "train")
    monkeypatch.setattr(prepared, "write_shard", lambda *a: written.append(a[3]) or real(*a))
    prepare(pattern_tree, tmp_path / "c", run_main)
    assert written[2:] == [2, 3, 4, 5] + list(range(6))  # train continued at shard 2; val from its start
    assert tree_bytes(tmp_path / "c") == first


def test_unreadable_images_are_skipped_and_listed(run_main, tmp_path):
    tree = write_pattern_tree(tmp_path / "tree")
    (tree / "train" / "b" / "broken.png").write_bytes(b"no")
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(tree),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "x"),
        "--set",
        "data.num_workers=0",
    )
    assert res.returncode == 1 and "broken.png: cannot read image" in res.stderr
    prepare(tree, tmp_path / "y", run_main, "--set", "data.on_bad_image=skip")
    info = json.loads((tmp_path / "y" / "prepared.json").read_text())["splits"]["train"]
    assert info["images"] == 16 and [s.rsplit("/", 1)[-1] for s in info["skipped"]] == ["broken.png"]
    assert len(PreparedSource(tmp_path / "y", "train")) == 16


def test_decoding_on_the_device_gives_the_pil_pipeline_s_images(run_main, tmp_path):
    """data.decode=gpu on a CPU device: the same decode-crop-resize in torch; a few levels from PIL's at most."""
    import numpy as np
    from PIL import Image

    from ldae_cli.data.pipeline import collate, decode_batch

    root = tmp_path / "jpegs"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64] / 64
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            img = np.stack([np.sin((3 + i) * 6.28 * xx + c) * 0.4 + 0.5 for c in range(3)], -1) + rng.normal(
                0, 0.02, (48, 64, 3)
            )
            Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / "train" / cls / f"{i}.jpg", quality=95)
    cfg = DataConfig(source="imagefolder", path=str(root), image_size=32, num_workers=0, decode="gpu", hflip=True)
    encoded = build_dataset(cfg, "train", training_stream=True)
    pil = build_dataset(cfg, "train")
    assert encoded.encoded and not pil.encoded
    keys = [(i, 7 + i) for i in range(8)]  # aug seeds: some of them flip
    on_device = decode_batch(collate([encoded[k] for k in keys]), 32, torch.device("cpu"))
    reference = collate([pil[k] for k in keys])
    assert on_device.images.shape == reference.images.shape == (8, 3, 32, 32)
    assert torch.equal(on_device.labels, reference.labels)
    diff = (on_device.images.float() - reference.images.float()).abs()
    assert diff.mean() < 2.0 and diff.max() <= 24, (float(diff.mean()), float(diff.max()))
    with pytest.raises(LdaeError, match="data.decode=gpu decodes center crops"):
        DataConfig(decode="gpu", crop="random-resized").validate()


def test_data_wait_is_logged(pattern_tree, run_main, tmp_path):
    pretrain(run_main, pattern_tree, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in records if "loss" in r]
    assert len(waits) == 6 and all(w is None or 0 <= w <= 1 for w in waits)
