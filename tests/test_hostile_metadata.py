"""Reliability matrix, edited metadata: every reader of a checkpoint (resume, --init-from, probe, export, denoise,
info and the Python API) compares the metadata that decides the network with its tensors, and the API refuses
what the CLI refuses, each in one line with every pre-existing file byte-identical."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import one_line, probe_args, rewrite_metadata, sets, snapshot, tiny_overrides, unchanged

import ldae_cli as ldae
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint, save_checkpoint


def _set(where: str, key: str, value):
    """An edit of config section / extra entry `where` (dotted: 'extra.model_spec', 'config.model')."""

    def edit(meta):
        node = meta
        for part in where.split("."):
            node = node[part]
        node[key] = value

    return edit


EDITS = {  # name: (edit, fragments of the line: the key and both values)
    "model_spec.width": (
        _set("extra.model_spec", "width", 64),
        ("model_spec.width 64", "model.embed.weight (32, 48) holds 32"),
    ),
    "config model.width": (_set("config.model", "width", 64), ("model.width 64", "model.embed.weight (32, 48)")),
    "tokenizer.patch 8": (
        _set("extra.tokenizer", "patch", 8),
        ("tokenizer.patch 8", "tokenizer.basis (48, 48) (p*p*3 values) holds 4"),
    ),
    "encoder_depth": (
        _set("extra.model_spec", "encoder_depth", 2),
        ("model_spec.encoder_depth + decoder_depth 3", "model.blocks.* (2 blocks) holds 2"),
    ),
    # no tensor shows the number of heads (they split the width inside attention): config and description agree
    "num_heads": (_set("config.model", "num_heads", 4), ("model.num_heads 4", "model_spec.num_heads holds 2")),
    # d is invisible behind this image-space network: the stored tokenizer is compared with the run's config
    "tokenizer.dim": (_set("extra.tokenizer", "dim", 16), ("tokenizer.dim (config) 8", "tokenizer's dim holds 16")),
    "image_size": (_set("extra", "image_size", 64), ("data.image_size 32", "image_size holds 64")),
    "grid": (_set("extra.model_spec", "grid", [16, 16]), ("model_spec.grid [16, 16]", "holds [8, 8]")),
    "has_ema without ema tensors": (_set("extra", "has_ema", True), ("has_ema true", "ema.* (any there) holds false")),
    "optim.ema without ema tensors": (
        _set("config.optim", "ema", 0.999),
        ("optim.ema (set) true", "has_ema holds false"),
    ),
}


def _reader(name: str, world, bad: Path, run: Path, tmp: Path) -> list[str]:
    image = next((world.images / "val" / "a").glob("*.png"))
    return {
        "resume": ["pretrain", "--resume", str(run)],
        "init-from": ["pretrain", "--init-from", str(bad), "--out", str(tmp / "init")],
        "probe": probe_args(world, tmp / "probe", ckpt=bad),
        "export": ["export", "--ckpt", str(bad), "--out", str(tmp / "vit.safetensors")],
        "denoise": ["denoise", str(image), "--ckpt", str(bad), "--out", str(tmp / "panel.png")],
        "info": ["info", str(bad)],
    }[name]


READERS = ("resume", "init-from", "probe", "export", "denoise", "info")
MATRIX = [
    (edit, reader) for edit in ("model_spec.width", "config model.width", "tokenizer.patch 8") for reader in READERS
] + [(edit, reader) for edit in list(EDITS)[3:] for reader in ("resume", "probe")]


@pytest.mark.parametrize("edit,reader", MATRIX, ids=[f"{e}-{r}" for e, r in MATRIX])
def test_edited_pretrain_metadata_is_named_by_every_reader(edit, reader, world, run_main, tmp_path):
    change, fragments = EDITS[edit]
    run = tmp_path / "run"
    shutil.copytree(world.cut.parent, run)
    rewrite_metadata(world.cut, run / "checkpoint.safetensors", change)
    bad = rewrite_metadata(world.ckpt, tmp_path / "bad.safetensors", change)
    before = snapshot(world.root, tmp_path)
    line = one_line(
        run_main(*_reader(reader, world, bad, run, tmp_path)), 1, *fragments, "the metadata is damaged or was edited"
    )
    assert str(run if reader == "resume" else bad) in line
    unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "run"]  # nothing new was written


def test_info_says_when_weights_are_not_finite(world, run_main, tmp_path):
    ck = load_checkpoint(world.ckpt)
    tensors = {**ck.tensors, "model.embed.weight": torch.full_like(ck.tensors["model.embed.weight"], float("nan"))}
    bad = save_checkpoint(tmp_path / "nan.safetensors", "pretrain", tensors, ck.config, extra=ck.extra)
    before = snapshot(tmp_path)
    line = one_line(run_main("info", str(bad)), 1, str(bad), "'model.embed.weight' holds NaN or infinite values")
    with pytest.raises(LdaeError) as caught:
        ldae.info(bad)
    assert str(caught.value) == line.removeprefix("error: ")
    unchanged(before)


def test_info_on_a_named_pipe_returns_at_once(run_main, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = []
    thread = threading.Thread(target=lambda: result.append(_raises(ldae.info, fifo)), daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # unblock the reader so that the test process can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("ldae info blocked on a named pipe")
    assert "not a regular file" in result[0]
    one_line(run_main("info", str(fifo)), 1, str(fifo), "not a regular file")


def _raises(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except LdaeError as exc:
        return str(exc)
    raise AssertionError(f"{fn.__name__} accepted {args} {kwargs}")


@pytest.mark.parametrize("sigma", [float("nan"), -1.0, 0.0])
def test_the_api_refuses_the_sigma_the_cli_refuses(sigma, world, run_main, tmp_path):
    image = next((world.images / "val" / "a").glob("*.png"))
    before = snapshot(world.root)
    line = one_line(
        run_main("denoise", str(image), "--ckpt", str(world.ckpt), "--sigma", str(sigma)), 1, "--sigma is a noise level"
    )
    pre = ldae.load_pretrained(world.ckpt)
    assert _raises(ldae.denoise, pre, image, sigma=sigma) == line.removeprefix("error: ")
    assert "--t must lie in 1..1000" in _raises(ldae.denoise, pre, image, t=float("nan"))
    unchanged(before)


def test_the_api_refuses_non_finite_image_tensors(world):
    encoder = ldae.load_encoder(world.ckpt)
    pre = ldae.load_pretrained(world.ckpt)
    for bad in (float("nan"), float("inf")):
        images = torch.zeros(2, 3, 32, 32)
        images[1, 0, 3, 3] = bad
        assert "holds NaN or infinite values" in _raises(ldae.extract_features, encoder, images)
        assert "holds NaN or infinite values" in _raises(ldae.denoise, pre, images)


def test_an_edited_pca_is_named_by_pretrain_and_info(world, run_main, tmp_path):
    bad = rewrite_metadata(world.pca, tmp_path / "pca.safetensors", _set("extra", "patch", 8))
    before = snapshot(world.root, tmp_path)
    fragments = (str(bad), "patch 8", "pca.basis (48, 48) (p*p*3 values) holds 4")
    args = [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(tiny_overrides(world.images, tmp_path / "run", **{"tokenizer.path": bad})),
    ]
    one_line(run_main(*args), 1, *fragments)
    one_line(run_main("info", str(bad)), 1, *fragments)
    assert not (tmp_path / "run").exists()
    unchanged(before)


@pytest.fixture(scope="module")
def encoder_export(world, tmp_path_factory) -> Path:
    from ldae_cli.model.pretrained import export_encoder

    return export_encoder(world.ckpt, tmp_path_factory.mktemp("export") / "vit.safetensors")


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("embed_dim", 64, "timm_kwargs.embed_dim 64, but tensor patch_embed.proj.weight (32, 3, 4, 4) holds 32"),
        ("patch_size", 8, "timm_kwargs.patch_size 8, but tensor patch_embed.proj.weight (32, 3, 4, 4) holds 4"),
        ("depth", 2, "timm_kwargs.depth 2, but tensors blocks.* (1 blocks) holds 1"),
    ],
)
def test_an_edited_encoder_export_is_named_by_probe_and_info(
    key, value, fragment, encoder_export, world, run_main, tmp_path
):
    def edit(meta):
        meta["extra"]["timm_kwargs"][key] = value

    bad = rewrite_metadata(encoder_export, tmp_path / "vit.safetensors", edit)
    before = snapshot(world.root, tmp_path, encoder_export.parent)
    one_line(run_main(*probe_args(world, tmp_path / "probe", ckpt=bad)), 1, str(bad), fragment)
    one_line(run_main("info", str(bad)), 1, str(bad), fragment)
    assert not (tmp_path / "probe").exists()
    unchanged(before)
