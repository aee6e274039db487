"""`ldae denoise`: a trained model removes latent noise (x0 and eps models), panels are drawn right."""

from __future__ import annotations

import pytest
import torch
from helpers import train_tiny
from PIL import Image

from ldae_cli.data.pipeline import load_image_file, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import DEFAULT_SIGMA, load_pretrained
from ldae_cli.stages import denoise as stage

SHORT = {
    "tokenizer.patch": 4,
    "tokenizer.dim": 8,
    "model.width": 64,
    "model.encoder_depth": 2,
    "model.decoder_depth": 2,
    "model.num_heads": 4,
    "optim.epochs": 60,
    "optim.warmup_epochs": 2,
    "optim.blr": 0.02,
    "run.log_every": 20,
}
EPS = {
    "diffusion.target": "eps",
    "diffusion.input_space": "latent",
    "diffusion.output_space": "latent",
    "diffusion.schedule": "linear-gamma2",
    "diffusion.loss_weight": "1",
}


@pytest.fixture(scope="module")
def models(pattern_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise")
    return {
        "x0": train_tiny("final.yaml", pattern_tree, root / "x0", **SHORT),
        "eps": train_tiny("final.yaml", pattern_tree, root / "eps", **SHORT, **EPS),
    }


@pytest.mark.parametrize("target", ["x0", "eps"])
def test_denoised_is_closer_to_clean_than_noisy(target, models, pattern_tree):
    pre = load_pretrained(models[target])
    files = sorted((pattern_tree / "val").rglob("*.png"))
    clean = to_unit_range(torch.stack([load_image_file(f, 32) for f in files]))
    t = pre.timestep()
    assert abs(float(pre.denoiser.schedule.sigma[t]) - DEFAULT_SIGMA) < 0.01
    noisy, denoised = pre.denoise(clean, t, seed=0)
    mse_noisy = (noisy - clean).square().mean()
    mse_denoised = (denoised - clean).square().mean()
    assert mse_denoised < 0.8 * mse_noisy, (float(mse_noisy), float(mse_denoised))


def test_panel_has_three_tiles_of_the_right_size(models, pattern_tree, tmp_path):
    files = sorted((pattern_tree / "val" / "a").glob("*.png"))[:2]
    written = stage.main([str(f) for f in files], ckpt=str(models["x0"]), out=str(tmp_path))
    assert [p.name for p in written] == [f"{f.stem}-denoised.png" for f in files]
    panel = Image.open(written[0])
    tile, pad, title = 32 * 4, 2, 14  # 32x32 images are enlarged 4x
    assert panel.size == (3 * (tile + pad) + pad, title + tile + 2 * pad)
    # the first tile is the clean input, enlarged with nearest neighbours
    clean = Image.open(files[0]).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
    first = panel.crop((pad, title + pad, pad + tile, title + pad + tile))
    assert list(first.getdata()) == list(clean.getdata())
    four = stage.main([str(files[0])], ckpt=str(models["x0"]), out=str(tmp_path / "one.png"), compare_pixel_noise=True)
    assert four == [tmp_path / "one.png"] and Image.open(four[0]).size[0] == 4 * (tile + pad) + pad


def test_any_image_size_and_mode(models, tmp_path):
    path = tmp_path / "odd.png"
    Image.new("LA", (57, 23), (128, 200)).save(path)
    out = stage.main([str(path)], ckpt=str(models["eps"]), out=str(tmp_path / "odd-out.png"))
    assert Image.open(out[0]).mode == "RGB"


def test_errors(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    with pytest.raises(LdaeError, match="no pretrain checkpoint found under runs/"):
        stage.main([str(img)])
    with pytest.raises(LdaeError, match="either --t or --sigma"):
        stage.main([str(img)], ckpt=str(models["x0"]), t=10, sigma=0.5)
    with pytest.raises(LdaeError, match="no such image or folder"):
        stage.main([str(tmp_path / "missing.jpg")], ckpt=str(models["x0"]))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(LdaeError, match="bad.jpg: cannot read image"):
        stage.main([str(tmp_path / "bad.jpg")], ckpt=str(models["x0"]))


def test_newest_checkpoint_is_the_default(models, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    for name, src in (("old", models["eps"]), ("new", models["x0"])):
        (tmp_path / "runs" / "pretrain" / name).mkdir(parents=True)
        shutil.copy(src, tmp_path / "runs" / "pretrain" / name / "checkpoint.safetensors")
    os.utime(tmp_path / "runs" / "pretrain" / "old" / "checkpoint.safetensors", (1, 1))
    assert stage.newest_checkpoint().parent.name == "new"
