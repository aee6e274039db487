"""MoCo v3 (`objective: mocov3`, ldae_cli/model/mocov3.py): each loss term against a direct computation, the momentum
update and its schedule, the views keyed by (seed, step), the frozen patch projection, the config's checks; then
runs through `ldae pretrain`: what a checkpoint holds, exact resume, two gloo ranks equal to one process, and the
evaluations reading the base encoder as they read an l-DAE one. benchmarks/check_mocov3_official.py checks the
pieces against the official code (benchmarks/results/mocov3-official.txt)."""

from __future__ import annotations

import json
import math
import os
import socket
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
from ldae_cli.model.mocov3 import (
    BLUR,
    BLUR_P,
    FLIP,
    GREY,
    HEIGHT,
    LEFT,
    SOLARIZE,
    SOLARIZE_P,
    TOP,
    WIDTH,
    MocoV3Objective,
    apply_views,
    info_nce,
    momentum_at,
)
from ldae_cli.model.models import build_model
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.runs.checkpoint import load_checkpoint, stored_config
from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig
from ldae_cli.stages import pretrain as stage

SIZE, PATCH, BATCH, SEED = 16, 4, 8, 3
CONFIG = "baselines/mocov3.yaml"


def objective(**overridden) -> MocoV3Objective:
    """A tiny MoCo v3 objective (mocov3.yaml at 16 px, 4-pixel patches, width 32, 2 blocks), its adaLN weights
    random so that t and the gates matter."""
    overrides = {
        "data.image_size": SIZE,
        "tokenizer.patch": PATCH,
        "model.size": "custom",
        "model.width": 32,
        "model.encoder_depth": 2,
        "model.num_heads": 2,
        "mocov3.mlp_dim": 64,
        "mocov3.dim": 16,
        **overridden,
    }
    cfg = load_config(PretrainConfig, CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    denoiser = Denoiser(cfg.diffusion, PixelTokenizer(PATCH), NoiseSchedule(cfg.diffusion), SIZE)
    torch.manual_seed(0)
    net = build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid)
    with torch.no_grad():
        for block in net.blocks:
            block.ada.net[-1].weight.normal_(0, 0.05)
    return MocoV3Objective(cfg, denoiser, net).train()


def tokenize(x: torch.Tensor) -> torch.Tensor:
    return PixelTokenizer(PATCH).encode(x)


def images(n: int = BATCH, size: int = SIZE) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def direct_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """ctr(q_i, k) written out: -log softmax_j(cos(q_i, k_j) / tau) at j = i, times 2 tau, in float64."""
    q, k = q.double(), k.double()
    out = []
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / tau for j in range(k.shape[0])]
        out.append(2 * tau * (math.log(sum(math.exp(v) for v in logits)) - logits[i]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_info_nce_is_the_scaled_cross_entropy_of_each_query_against_all_keys(tau):
    q, k = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(int(tau * 10))).unbind()
    assert torch.allclose(info_nce(q, k, tau).double(), direct_ctr(q, k, tau), atol=1e-5)


def test_the_loss_pairs_each_view_s_query_with_the_other_view_s_key():
    obj = objective()
    x1, x2 = tokenize(torch.rand(2, BATCH, 3, SIZE, SIZE).flatten(0, 1) * 2 - 1).chunk(2)
    loss = obj.loss_from_tokens(x1, x2)
    with torch.no_grad():  # the same modules by hand, view by view (each BatchNorm sees one view's batch)
        h1, h2 = obj.pooled(obj.net, torch.cat([x1, x2])).chunk(2)
        proj, pred = obj.heads["projector"], obj.heads["predictor"]
        q1, q2 = pred(proj(h1)), pred(proj(h2))
        m1, m2 = obj.pooled(obj.momentum.encoder, torch.cat([x1, x2])).chunk(2)
        k1, k2 = obj.momentum.projector(m1), obj.momentum.projector(m2)
    tau = obj.cfg.temperature
    expected = direct_ctr(q1, k2, tau) + direct_ctr(q2, k1, tau)
    assert torch.allclose(loss.detach().double(), expected, atol=1e-5)
    assert not torch.allclose(loss.detach().double(), direct_ctr(q1, k1, tau) + direct_ctr(q2, k2, tau), atol=1e-3)


def test_momentum_schedule_endpoints():
    cfg = MocoV3Config(momentum=0.99)
    assert momentum_at(0, 100, cfg) == pytest.approx(0.99)
    assert momentum_at(50, 100, cfg) == pytest.approx(0.995)
    assert momentum_at(100, 100, cfg) == pytest.approx(1.0)
    ms = [momentum_at(k, 100, cfg) for k in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert momentum_at(70, 100, MocoV3Config(momentum=0.99, momentum_cosine=False)) == 0.99


def test_momentum_update_blends_the_base_encoder_and_projector_at_the_next_step_s_momentum():
    obj = objective(**{"mocov3.momentum": 0.9})
    base, mom = obj.ema_pairs()
    assert len(base) == len(mom) and all(not p.requires_grad for p in mom)
    assert all(torch.equal(b, m) for b, m in zip(base, mom))  # the copy starts equal
    with torch.no_grad():
        for p in base:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mom]
    obj.after_step(3, 10)
    m = momentum_at(4, 10, obj.cfg)
    for b, old, new in zip(base, before, mom):
        assert torch.allclose(new, m * old + (1 - m) * b, atol=1e-6)
    predictor_ids = {id(p) for p in obj.heads["predictor"].parameters()}
    assert not predictor_ids & {id(p) for p in base}  # the predictor has no momentum twin
    assert not any(key.startswith("final.") for key in obj.momentum.encoder.state_dict())  # no denoising head


def test_views_are_keyed_by_seed_and_step_whatever_the_split():
    obj, imgs = objective(), images()
    (params,) = obj.draw(SEED, 5, BATCH, "cpu")
    assert torch.equal(params, obj.draw(SEED, 5, BATCH, "cpu")[0])
    assert not torch.equal(params, obj.draw(SEED, 6, BATCH, "cpu")[0])
    assert not torch.equal(params, obj.draw(SEED + 1, 5, BATCH, "cpu")[0])
    whole = apply_views(imgs, params, obj.kernel)
    assert whole.dtype == torch.uint8 and whole.shape == (2 * BATCH, 3, SIZE, SIZE)
    for pieces in (2, 4):  # two or four ranks' slices
        n = BATCH // pieces
        parts = [
            apply_views(imgs[i : i + n], params[i : i + n], obj.kernel).view(2, n, 3, SIZE, SIZE)
            for i in range(0, BATCH, n)
        ]
        assert torch.equal(torch.cat(parts, 1).flatten(0, 1), whole)
    assert not torch.equal(whole[:BATCH], whole[BATCH:])


def test_view_draws_follow_the_recipe():
    (p,) = objective().draw(SEED, 0, 4000, "cpu")
    top, left, h, w = (p[..., c] for c in (TOP, LEFT, HEIGHT, WIDTH))
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= SIZE).all() and (left + w <= SIZE).all())
    assert bool((h * w >= math.floor(0.08 * SIZE * SIZE)).all())
    for col, rates in ((BLUR, BLUR_P), (SOLARIZE, SOLARIZE_P), (FLIP, (0.5, 0.5)), (GREY, (0.2, 0.2))):
        for view, rate in enumerate(rates):
            assert abs(float(p[:, view, col].mean()) - rate) < 5 * math.sqrt(rate * (1 - rate) / 4000) + 1e-9


def test_the_patch_projection_stays_frozen_and_out_of_the_optimizer():
    obj = objective()
    embed = obj.net.embed.weight.clone()
    optimizer = torch.optim.AdamW(obj.param_groups(0.1), lr=1e-2, weight_decay=0.1)
    obj(images(), None, *obj.draw(SEED, 0, BATCH, "cpu")).mean().backward()
    assert obj.net.embed.weight.grad is None and obj.net.embed.bias.grad is None
    trainable = {id(p) for p in obj.param_groups(0.1)}
    assert id(obj.net.embed.weight) not in trainable and id(obj.net.final.linear.weight) not in trainable
    assert all(p.grad is not None for p in obj.param_groups(0.1))
    optimizer.step()
    assert torch.equal(obj.net.embed.weight, embed)
    assert objective(**{"mocov3.freeze_patch_embed": False}).net.embed.weight.requires_grad


def test_a_mocov3_config_is_checked_in_one_line():
    with pytest.raises(LdaeError, match="objective mocov3: tokenizer.kind 'pca' .*model.decoder_depth 2"):
        load_config(
            PretrainConfig, CONFIG, ["tokenizer.kind=pca", "tokenizer.latent_scale=global", "model.decoder_depth=2"]
        )
    with pytest.raises(LdaeError, match="data.crop 'random-resized' .*data.hflip True"):
        load_config(PretrainConfig, CONFIG, ["data.crop=random-resized", "data.hflip=true"])
    with pytest.raises(LdaeError, match="online_probe.t 500"):
        load_config(PretrainConfig, CONFIG, ["online_probe.t=500"])
    with pytest.raises(LdaeError, match="mocov3.crop_scale"):
        load_config(PretrainConfig, CONFIG, ["mocov3.crop_scale=[0.5,0.2]"])


def test_accumulation_and_compile_are_refused_in_one_line(run_main):
    one_line(
        run_main("pretrain", "--config", CONFIG, "--set", "optim.micro_batch=1024"),
        1,
        "optim.micro_batch 1024: MoCo v3 takes no gradient accumulation",
        "set optim.micro_batch=null",
    )
    one_line(
        run_main("pretrain", "--config", CONFIG, "--set", "run.compile=true"),
        1,
        "run.compile: MoCo v3",
        "set run.compile=false",
    )


# ------------------------------------------------------------------ runs through `ldae pretrain`

TINY = {"model.decoder_depth": 0, "tokenizer.patch": 4, "mocov3.mlp_dim": 32, "mocov3.dim": 16}


@pytest.fixture(scope="module")
def moco_run(pattern_tree, tmp_path_factory):
    """A finished 4-step MoCo v3 run at toy size (online probe on; an lr at which the weights visibly move)."""
    root = tmp_path_factory.mktemp("mocov3")
    return train_tiny(
        CONFIG,
        pattern_tree,
        root / "pre",
        **TINY,
        **{"online_probe.per_class": 1, "online_probe.max_share": 1, "optim.lr": 1e-2, "optim.epochs": 2},
    )


def test_a_run_saves_the_base_encoder_where_evaluations_read_it_and_its_heads_and_momentum_apart(moco_run):
    ck = load_checkpoint(moco_run, "pretrain")
    assert ck.config["objective"] == "mocov3" and ck.extra["model_spec"]["decoder_depth"] == 0
    assert {k.split(".")[0] for k in ck.tensors} == {"model", "mocov3", "optim", "meter"}
    assert {
        "mocov3.heads.projector.1.running_mean",
        "mocov3.heads.predictor.0.weight",
        "mocov3.momentum.projector.0.weight",
        "mocov3.momentum.encoder.blocks.0.attn.qkv.weight",
    } <= set(ck.tensors)
    model, momentum = ck.section("model"), ck.section("mocov3")
    _, _, start = stage.build(stored_config(PretrainConfig, ck), None, ck, lambda: None, 2)  # the run's init
    qkv = "blocks.0.attn.qkv.weight"  # the momentum encoder followed the base encoder, lagging behind it
    init, mom = start.net.state_dict()[qkv], momentum[f"momentum.encoder.{qkv}"]
    assert 0 < float((mom - init).abs().max()) < float((model[qkv] - init).abs().max())
    # the frozen projection: in both (up to the update's rounding, m x + (1 - m) x, as in the official update)
    torch.testing.assert_close(model["embed.weight"], momentum["momentum.encoder.embed.weight"], rtol=0, atol=1e-6)
    records = [json.loads(x) for x in (moco_run.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "online_knn_top1" in r] == [1, 2, 3, 4]


def test_init_from_starts_the_momentum_encoder_as_the_base_one(moco_run, pattern_tree, tmp_path):
    """From a MoCo run: its encoder, heads and momentum encoder. From another objective's run (an MAE one of the same
    network): its encoder, and the momentum encoder as that encoder, as a fresh run's starts as its base one."""
    parent = load_checkpoint(moco_run, "pretrain")
    cfg = stored_config(PretrainConfig, parent)
    _, _, obj = stage.build(cfg, None, parent, lambda: None, 2)
    stage.start_from(obj, parent, "mocov3")
    for section, module in (("model", obj.net), ("mocov3", obj.saved_modules()["mocov3"])):
        assert all(torch.equal(v, parent.section(section)[k]) for k, v in module.state_dict().items()), section
    mae = train_tiny(
        "baselines/mae.yaml",
        pattern_tree,
        tmp_path / "mae",
        **{
            "model.decoder_depth": 0,
            "tokenizer.patch": 4,
            "mae.decoder_width": 16,
            "mae.decoder_depth": 1,
            "mae.decoder_heads": 2,
            "online_probe.enabled": False,
        },
    )
    other = load_checkpoint(mae, "pretrain")
    _, _, obj = stage.build(cfg, None, other, lambda: None, 2)
    stage.start_from(obj, other, "mocov3")
    base, mom = obj.ema_pairs()
    assert torch.equal(obj.net.blocks[0].attn.qkv.weight, other.section("model")["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(b, m) for b, m in zip(base, mom))


def test_probe_export_info_and_the_api_read_the_base_encoder(moco_run, run_main, tmp_path):
    """The folded encoder at t = 10 is the base encoder MoCo trained, before its heads: its features are the model's
    own on every patch."""
    vit, pre = api.load_encoder(moco_run), api.load_pretrained(moco_run)
    x = to_unit_range(images(3, 32)).float()
    with torch.no_grad():
        own = pre.model.features(pre.tokenizer.encode(x), torch.full((3,), DEFAULT_T)).mean(1)
    torch.testing.assert_close(api.extract_features(vit, x), own, rtol=1e-5, atol=1e-5)
    res = run_main("export", "--ckpt", str(moco_run), "--out", str(tmp_path / "timm"), "--format", "timm")
    assert res.returncode == 0, res.stderr
    torch.testing.assert_close(api.extract_features(api.load_encoder(tmp_path / "timm"), x), own, rtol=1e-5, atol=1e-5)
    assert "MoCo v3 encoder" in (tmp_path / "timm" / "README.md").read_text()
    res = run_main(*probe_args(None, tmp_path / "probe", ckpt=moco_run))
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["encoder"] == "mocov3 encoder, 1 blocks" and 0 <= results["selected_top1"] <= 100
    info = api.info(moco_run)
    assert info["config"]["objective"] == {"objective": "mocov3"} and info["config"]["mocov3"]["temperature"] == 0.2
    assert "diffusion" not in info["config"] and "mae" not in info["config"]
    res = run_main("info", str(moco_run))
    assert res.returncode == 0 and "mocov3" in res.stdout and "temperature" in res.stdout


def test_a_mocov3_checkpoint_has_no_timestep_and_no_denoiser(moco_run, run_main, tmp_path):
    one_line(
        run_main("export", "--ckpt", str(moco_run), "--out", str(tmp_path / "e.safetensors"), "--t", "500"),
        1,
        "an 'mocov3' encoder has no timestep",
        "leave t at 10",
    )
    one_line(
        run_main("denoise", "--ckpt", str(moco_run), "--samples", "2", "--out", str(tmp_path / "d")),
        1,
        "an 'mocov3' checkpoint has no denoiser",
    )


def test_resume_of_a_mocov3_run_is_bit_exact(pattern_tree, tmp_path):
    """The CPU demo's recipe at toy size, stopped and resumed: the momentum encoder, the heads' BatchNorm statistics,
    the EMA and AdamW's state come back exactly."""
    sets = {**TINY, "optim.epochs": 3, "optim.ema": 0.9, "run.save_every": 2, "online_probe.enabled": False}
    a, _ = assert_resume_is_bit_exact(
        "demo/cifar10-mocov3.yaml", pattern_tree, tmp_path, sets, ("model", "mocov3", "ema", "optim")
    )
    assert any(k.endswith("running_var") for k in a.section("mocov3"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Weights with no true gradient: the key bias (softmax ignores a shift of every logit) and, with one block, fc2's bias
# (it shifts every pooled feature alike, which the projector's first BatchNorm removes). AdamW moves them by about lr
# a step on rounding noise, which another summation order changes; that BatchNorm's running mean carries the shift.
NO_GRADIENT = ("mlp.fc2.bias", "projector.1.running_mean")


def test_two_ranks_equal_one_process(pattern_tree, tmp_path):
    """2 gloo ranks x 4 images == 1 process x 8 images through `ldae pretrain`: the InfoNCE keys all-gathered and the
    heads' BatchNorm statistics taken over both ranks, so every step's loss, the base encoder, the heads with their
    running statistics and the momentum encoder are one process's (a rank's own negatives or BatchNorm statistics
    are off by 1e-2 or more), at an lr where the weights move."""

    def args(out):
        return [
            "pretrain",
            "--config",
            CONFIG,
            *sets(
                tiny_overrides(
                    pattern_tree,
                    tmp_path / out,
                    **TINY,
                    **{"optim.epochs": 2, "optim.lr": 1e-2, "online_probe.enabled": False},
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
            str(free_port()),
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
    assert len(losses[0]) == len(losses[1]) == 4 and len(set(losses[0])) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.safetensors") for run in ("one", "two"))
    compared = 0
    for section in ("model", "mocov3"):
        for key, value in a.section(section).items():
            other = b.section(section)[key]
            if key.endswith("attn.qkv.bias"):  # the query and value thirds
                value, other = value.view(3, -1)[[0, 2]], other.view(3, -1)[[0, 2]]
            elif key.endswith(NO_GRADIENT):
                continue
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=f"{section}.{key}")
            compared += 1
    assert compared > 50 and any("running_var" in k for k in a.section("mocov3"))
