"""MAE (`objective: mae`, ldae_cli/model/mae.py): its step against a reference written here from the paper's
equations, the masking, each loss term, exact resume, and the evaluations reading an MAE checkpoint as they read an
l-DAE one. The comparison with facebookresearch/mae's own models_mae.py needs that repository's mirror, which a
clone does not have: it is benchmarks/mae_official.py, its output docs/mae-official-check.txt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    REPO_ROOT,
    assert_resume_is_bit_exact,
    one_line,
    probe_args,
    run_cli,
    sets,
    tiny_overrides,
    train_tiny,
)

from ldae_cli import api
from ldae_cli.config import load_config
from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
from ldae_cli.model.mae import MAEObjective, masked_loss
from ldae_cli.model.models import build_model, build_timm_vit, fold_to_vit
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.runs.checkpoint import load_checkpoint, stored_config
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig
from ldae_cli.stages import pretrain as stage
from ldae_cli.train.engine_pretrain import optimizer_step

CONFIG = "baselines/mae.yaml"
TINY = {
    "model.decoder_depth": 0,
    "tokenizer.patch": 4,
    "mae.decoder_width": 16,
    "mae.decoder_depth": 1,
    "mae.decoder_heads": 2,
}


def objective(size: int = 16, norm_pix: bool = True, **sets) -> MAEObjective:
    """A tiny MAE objective (mae.yaml at 16 px, 4-pixel patches: 16 patches, 4 kept), every weight random."""
    overrides = {
        "data.image_size": size,
        "tokenizer.patch": 4,
        "model.size": "custom",
        "model.width": 32,
        "model.encoder_depth": 2,
        "model.decoder_depth": 0,
        "model.num_heads": 4,
        "mae.decoder_width": 16,
        "mae.decoder_depth": 2,
        "mae.decoder_heads": 2,
        "mae.norm_pix_loss": norm_pix,
        **sets,
    }
    cfg = load_config(PretrainConfig, CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    denoiser = Denoiser(cfg.diffusion, PixelTokenizer(4), NoiseSchedule(cfg.diffusion), size)
    torch.manual_seed(0)
    obj = MAEObjective(cfg, denoiser, build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid))
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return obj


def images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference(obj: MAEObjective, imgs: torch.Tensor, noise: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """The paper's step image by image: keep the patches of the N(1 - r) smallest noise values; the encoder (the
    folded ViT every evaluation reads) on those alone; the decoder on them and a mask token at each hidden position;
    the mean squared error over the hidden patches of each patch's pixels, normalised by its mean and unbiased
    variance when norm_pix. Loops and sets, no argsort or gather."""
    p, dec = 4, obj.decoder
    state, kwargs = fold_to_vit(obj.net, DEFAULT_T, p, obj.denoiser.tokenizer.affine())
    vit = build_timm_vit(kwargs)
    vit.load_state_dict(state)
    x = to_unit_range(imgs).float()
    grid = x.shape[-1] // p
    n, keep = grid * grid, int(grid * grid * 0.25)
    losses = []
    for b in range(len(x)):
        kept = sorted(range(n), key=lambda j: noise[b, j].item())[:keep]
        tokens = vit.patch_embed(x[b : b + 1])[0] + vit.pos_embed[0]
        h = tokens[kept][None]
        for block in vit.blocks:
            h = block(h)
        h = dec.embed(dec.norm(h[0]))
        seq = torch.stack([h[kept.index(j)] if j in kept else dec.mask_token[0, 0] for j in range(n)])
        seq = (seq + dec.pos_embed[0])[None]
        for block in dec.blocks:
            seq = block(seq)
        pred = dec.pred(dec.out_norm(seq[0]))
        errors = []
        for j in (j for j in range(n) if j not in kept):
            r, c = divmod(j, grid)
            target = x[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mean = target.mean()
                target = (target - mean) / (((target - mean) ** 2).sum() / (len(target) - 1) + 1e-6) ** 0.5
            errors.append(((pred[j] - target) ** 2).mean())
        losses.append(torch.stack(errors).mean())
    return torch.stack(losses)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_step_is_the_papers(norm_pix):
    obj = objective(norm_pix=norm_pix).eval()
    imgs = images()
    (noise,) = obj.draw(0, 3, len(imgs), torch.device("cpu"))
    with torch.no_grad():
        loss = obj(imgs, None, noise)
    torch.testing.assert_close(loss, reference(obj, imgs, noise, norm_pix), rtol=1e-5, atol=1e-6)


def test_the_masking_hides_the_same_count_in_every_image_keyed_by_seed_and_step():
    obj = objective()
    cpu = torch.device("cpu")
    (noise,) = obj.draw(5, 11, 64, cpu)
    out = obj.reconstruct(images(64), noise)
    assert obj.keep == 4 and out["ids_keep"].shape == (64, 4) and out["pred"].shape == (64, 16, 48)
    assert (out["mask"].sum(1) == 12).all()  # 75 % of 16 patches in every image
    smallest = noise.argsort(1)[:, :4]
    assert all(set(k.tolist()) == set(s.tolist()) for k, s in zip(out["ids_keep"], smallest))
    assert all(out["mask"][i, out["ids_keep"][i]].sum() == 0 for i in range(64))
    assert out["latent"].shape == (64, 4, 32)  # the encoder saw the kept patches only
    assert torch.equal(obj.draw(5, 11, 64, cpu)[0], noise)
    assert not torch.equal(obj.draw(5, 12, 64, cpu)[0], noise) and not torch.equal(obj.draw(6, 11, 64, cpu)[0], noise)
    assert not (out["mask"] == out["mask"][0]).all(1).all()  # per image, not one mask for the batch


def test_two_ranks_slices_of_the_draw_are_one_process():
    """Rank r of 2 takes rows [4r, 4r + 4) of the global draw: the two ranks' losses and averaged gradients are those
    of one process on all 8 images."""
    imgs, labels = images(8), torch.zeros(8, dtype=torch.long)

    def grads(offset: int, count: int, micro: int) -> tuple[float, list[torch.Tensor]]:
        obj = objective()
        optimizer = torch.optim.SGD(obj.param_groups(0.0), lr=0.0)
        draw = obj.draw(0, 4, 8, torch.device("cpu"))
        batches = [(imgs[i : i + micro], labels[i : i + micro]) for i in range(offset, offset + count, micro)]
        captured = []
        optimizer.step = lambda: captured.extend(p.grad.clone() for g in optimizer.param_groups for p in g["params"])
        total, n = optimizer_step(obj, obj.net, optimizer, batches, draw, offset, count, None, False)
        return float(total) / n, captured

    one_loss, one = grads(0, 8, 8)
    (loss0, g0), (loss1, g1) = grads(0, 4, 2), grads(4, 4, 4)  # rank 0 with two micro-batches, rank 1 with one
    assert abs((loss0 + loss1) / 2 - one_loss) < 1e-6
    for a, b, c in zip(g0, g1, one):
        torch.testing.assert_close((a + b) / 2, c, rtol=1e-4, atol=1e-7)


def test_each_loss_term():
    patches = torch.randn(2, 6, 12)
    pred = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float)
    plain = masked_loss(pred, patches, mask, norm_pix=False)
    expected = torch.stack([((pred[i] - patches[i]) ** 2).mean(1)[mask[i].bool()].mean() for i in range(2)])
    torch.testing.assert_close(plain, expected)
    visible_changed = pred.clone()
    visible_changed[mask == 0] += 5.0
    assert torch.equal(masked_loss(visible_changed, patches, mask, False), plain)  # visible patches do not count
    hidden_changed = pred.clone()
    hidden_changed[0, 0] += 1.0
    assert masked_loss(hidden_changed, patches, mask, False)[0] > plain[0]
    # norm_pix: each target patch at mean 0 and unbiased variance 1 (up to the 1e-6), so a patch and its affine copy
    # are the same target
    shifted = patches * 3.0 + 2.0
    torch.testing.assert_close(
        masked_loss(pred, shifted, mask, True), masked_loss(pred, patches, mask, True), rtol=1e-5, atol=1e-5
    )
    target = (patches - patches.mean(-1, keepdim=True)) / patches.std(-1, keepdim=True)
    torch.testing.assert_close(
        masked_loss(pred, patches, mask, True), masked_loss(pred, target, mask, False), rtol=1e-5, atol=1e-5
    )


def test_an_mae_config_is_checked_in_one_line():
    with pytest.raises(LdaeError, match="tokenizer.kind 'pca' .*model.decoder_depth 2"):
        load_config(
            PretrainConfig, CONFIG, ["tokenizer.kind=pca", "tokenizer.latent_scale=global", "model.decoder_depth=2"]
        )
    with pytest.raises(LdaeError, match="online_probe.t 500"):
        load_config(PretrainConfig, CONFIG, ["online_probe.t=500"])
    with pytest.raises(LdaeError, match="mae.mask_ratio must be in"):
        load_config(PretrainConfig, CONFIG, ["mae.mask_ratio=1.0"])
    with pytest.raises(LdaeError, match="mae.decoder_width 30 must be divisible by mae.decoder_heads 16"):
        load_config(PretrainConfig, CONFIG, ["mae.decoder_width=30"])
    with pytest.raises(LdaeError, match="keeps 0 of the 16 patches"):
        objective(**{"mae.mask_ratio": 0.95})


@pytest.fixture(scope="module")
def mae_run(pattern_tree, tmp_path_factory):
    """A finished 2-step MAE run at toy size (online probe on)."""
    root = tmp_path_factory.mktemp("mae")
    return train_tiny(
        CONFIG, pattern_tree, root / "pre", **TINY, **{"online_probe.per_class": 1, "online_probe.max_share": 1}
    )


def test_a_run_saves_the_encoder_where_evaluations_read_it_and_the_decoder_apart(mae_run):
    ck = load_checkpoint(mae_run, "pretrain")
    assert ck.config["objective"] == "mae" and ck.extra["model_spec"]["decoder_depth"] == 0
    assert {k.split(".")[0] for k in ck.tensors} == {"model", "mae", "optim", "meter"}
    assert "mae.mask_token" in ck.tensors and "mae.blocks.0.attn.qkv.weight" in ck.tensors
    records = [json.loads(x) for x in (mae_run.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "online_knn_top1" in r] == [1, 2]


def test_init_from_an_mae_run_starts_from_its_encoder_and_decoder(mae_run):
    parent = load_checkpoint(mae_run, "pretrain")
    _, _, obj = stage.build(stored_config(PretrainConfig, parent), None, parent, lambda: None, 2)
    stage.start_from(obj, parent, "mae")
    for section, module in (("model", obj.net), ("mae", obj.decoder)):
        assert all(torch.equal(v, parent.section(section)[k]) for k, v in module.state_dict().items()), section


def test_probe_export_info_and_the_api_read_an_mae_checkpoint(mae_run, run_main, tmp_path):
    """The folded encoder at t = 10 is the encoder MAE trained: its features are the model's own on every patch."""
    vit = api.load_encoder(mae_run)
    pre = api.load_pretrained(mae_run)
    x = to_unit_range(images(3, 32)).float()
    with torch.no_grad():
        own = pre.model.features(pre.tokenizer.encode(x), torch.full((3,), DEFAULT_T)).mean(1)
    torch.testing.assert_close(api.extract_features(vit, x), own, rtol=1e-5, atol=1e-5)
    res = run_main("export", "--ckpt", str(mae_run), "--out", str(tmp_path / "timm"), "--format", "timm")
    assert res.returncode == 0, res.stderr
    torch.testing.assert_close(api.extract_features(api.load_encoder(tmp_path / "timm"), x), own, rtol=1e-5, atol=1e-5)
    res = run_main(*probe_args(None, tmp_path / "probe", ckpt=mae_run))
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["encoder"] == "mae encoder, 1 blocks" and 0 <= results["selected_top1"] <= 100
    info = api.info(mae_run)
    assert info["config"]["objective"] == {"objective": "mae"} and info["config"]["mae"]["mask_ratio"] == 0.75
    assert "diffusion" not in info["config"]
    res = run_main("info", str(mae_run))
    assert res.returncode == 0 and "mask_ratio" in res.stdout


def test_an_mae_checkpoint_has_no_timestep_and_no_denoiser(mae_run, run_main, tmp_path):
    one_line(
        run_main("export", "--ckpt", str(mae_run), "--out", str(tmp_path / "e.safetensors"), "--t", "500"),
        1,
        "an 'mae' encoder has no timestep",
        "leave t at 10",
    )
    one_line(
        run_main("denoise", "--ckpt", str(mae_run), "--samples", "2", "--out", str(tmp_path / "d")),
        1,
        "an 'mae' checkpoint has no denoiser",
    )


def test_resume_of_an_mae_run_is_bit_exact(pattern_tree, tmp_path):
    """The CPU demo's recipe (random-resized crops and flips too) at toy size, stopped and resumed."""
    sets = {**TINY, "optim.epochs": 3, "optim.ema": 0.9, "run.save_every": 2, "online_probe.enabled": False}
    assert_resume_is_bit_exact("demo/cifar10-mae.yaml", pattern_tree, tmp_path, sets, ("model", "mae", "ema", "optim"))


def test_ddp_two_ranks_match_one_process(pattern_tree, tmp_path):
    """2 gloo ranks x 4 images == 1 process x 8 images: DDP over the objective, its frozen denoising head left out."""

    def args(out):
        return [
            "pretrain",
            "--config",
            CONFIG,
            *sets(
                tiny_overrides(
                    pattern_tree, tmp_path / out, **TINY, **{"optim.epochs": 3, "online_probe.enabled": False}
                )
            ),
        ]

    one = run_cli(*args("one"), timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29541",
            "-m",
            "ldae_cli",
            *args("two"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-2000:]
    losses = [
        [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == len(losses[1]) == 6
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
