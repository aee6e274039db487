"""Fine-tuning: the MAE recipe's pieces (layer decay, mixup/cutmix targets, EMA, keyed RandAugment),
the network built from a pretrain checkpoint or from scratch, exact resume, and a tiny run that learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldae_cli.config import load_config, to_dict
from ldae_cli.errors import LdaeError
from ldae_cli.model.models import DenoisingViT, sincos_2d
from ldae_cli.model.pretrained import load_encoder
from ldae_cli.model.tokenizers import PCATokenizer
from ldae_cli.runs.checkpoint import load_checkpoint, save_checkpoint
from ldae_cli.settings.optim import make_ema, set_lr
from ldae_cli.stages import finetune as stage
from ldae_cli.stages.pretrain import PretrainConfig
from ldae_cli.train.engine_finetune import BatchAugment, SeededRandAugment, layer_decay_groups


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> Path:
    """16x16 noisy images whose top or bottom half is bright (random colour): train/val x 2 classes."""
    root = tmp_path_factory.mktemp("halves")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 12)):
        for c, cls in enumerate(("top", "bottom")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (16, 16, 3))
                img[slice(0, 8) if c == 0 else slice(8, 16)] += rng.integers(120, 196, 3)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A pretrain checkpoint of a tiny l-DAE (16x16 images, patch 4, width 32, 2 + 1 blocks), weights randomised
    (adaLN-Zero would otherwise fold to identity blocks)."""
    torch.manual_seed(0)
    cfg = PretrainConfig()
    cfg.data.image_size = 16
    cfg.model.size, cfg.model.width, cfg.model.encoder_depth, cfg.model.decoder_depth = "custom", 32, 2, 1
    cfg.model.num_heads = 2
    cfg.tokenizer.patch, cfg.tokenizer.dim = 4, 8
    basis, _ = torch.linalg.qr(torch.randn(48, 48))
    tok = PCATokenizer(torch.randn(48) * 0.1, basis.T.contiguous(), torch.rand(48).sort(descending=True)[0], 4, 8)
    model = DenoisingViT(48, 48, (4, 4), 32, 2, 1, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    tok_tensors, tok_desc = tok.export()
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"tokenizer.{k}": v for k, v in tok_tensors.items()},
    }
    extra = {
        "model_spec": model.spec,
        "tokenizer": tok_desc,
        "image_size": 16,
        "num_classes": 0,
        "has_ema": False,
        "finished": True,
    }
    return save_checkpoint(
        tmp_path_factory.mktemp("pre") / "pre.safetensors", "pretrain", tensors, to_dict(cfg), extra=extra
    )


def tiny(data: Path, out: Path, **extra) -> list[str]:
    """Overrides of finetune/cifar10 for the halves data and a 2-block width-32 ViT."""
    sets = {
        "data.source": "imagefolder",
        "data.path": str(data),
        "data.image_size": 16,
        "data.num_workers": 0,
        "model.arch.width": 32,
        "model.arch.depth": 2,
        "model.arch.num_heads": 2,
        "optim.batch_size": 16,
        "optim.ema": 0.9,
        "run.out_dir": str(out),
        "run.progress": False,
        "run.log_every": 1,
        "run.device": "cpu",
    }
    sets.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def config(data: Path, out: Path, ckpt: str | None = None, from_scratch: bool = False, **extra):
    flags = {"model.ckpt": ckpt, "model.from_scratch": from_scratch or None}
    return load_config(stage.FinetuneConfig, "finetune/cifar10", tiny(data, out, **extra), flags)


def log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_presets_carry_the_papers_numbers():
    def get(name):
        return load_config(stage.FinetuneConfig, f"finetune/{name}")

    b, lg, mb, ml = get("ldae-B"), get("ldae-L"), get("mae-B"), get("mae-L")
    assert (b.optim.batch_size, b.optim.base_lr(), b.optim.layer_decay, b.model.drop_path, b.optim.epochs) == (
        1024,
        4e-3,
        0.85,
        0.1,
        100,
    )
    assert (b.optim.weight_decay, b.optim.warmup_epochs, b.optim.ema, b.aug.mixup, b.aug.cutmix) == (
        0.05,
        5,
        0.9999,
        0.8,
        1.0,
    )
    assert (b.aug.rand_augment, b.aug.label_smoothing, b.aug.erase_prob, b.data.image_size) == (
        "rand-m9-mstd0.5-inc1",
        0.1,
        0.25,
        256,
    )
    assert (lg.optim.layer_decay, lg.optim.base_lr(), lg.model.arch.size) == (0.65, 4e-3, "L")
    assert (mb.optim.blr, mb.optim.base_lr(), mb.optim.layer_decay, mb.model.drop_path, mb.optim.epochs) == (
        5e-4,
        2e-3,
        0.65,
        0.1,
        100,
    )
    assert (ml.optim.blr, ml.optim.layer_decay, ml.model.drop_path, ml.optim.epochs) == (1e-3, 0.75, 0.2, 50)
    for cpu in ("cifar10", "fmnist"):
        c = get(cpu)
        assert (c.data.image_size, c.model.arch.patch, c.model.arch.width, c.model.arch.depth) == (32, 4, 128, 4)
        assert c.optim.layer_decay == b.optim.layer_decay and c.aug == b.aug  # the recipe, scaled in time only
    assert get("fmnist").data.source == "fashion-mnist"


def test_layer_decay_gives_block_i_scale_decay_to_depth_plus_1_minus_layer_id(halves, tmp_path):
    cfg = config(halves, tmp_path, from_scratch=True, **{"model.arch.depth": 3})
    model, kwargs, _, _ = stage.build_network(cfg, 2, stage.vit_arch(cfg))
    depth, decay = kwargs["depth"], 0.8
    groups = layer_decay_groups(model, 0.05, decay)
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = name_of[id(p)]
            seen.add(name)
            if name.startswith("blocks."):
                layer_id = int(name.split(".")[1]) + 1
            elif name.startswith(("patch_embed", "pos_embed")):
                layer_id = 0
            else:
                assert name.startswith(("fc_norm", "head")), name
                layer_id = depth + 1
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer_id)), name
            no_decay = p.ndim <= 1 or name == "pos_embed"  # norms, biases, position embedding
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == {n for n, _ in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 2.0)
    assert all(g["lr"] == pytest.approx(2.0 * g["lr_scale"]) for g in optimizer.param_groups)


def test_mixup_cutmix_targets_are_distributions_and_keyed():
    from ldae_cli.train.engine_finetune import seeded_rngs

    aug = BatchAugment(
        5,
        mixup=0.8,
        cutmix=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.1,
        erase_prob=0.25,
        erase_mode="pixel",
        erase_count=1,
    )
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    images = torch.rand(8, 3, 8, 8) * 2 - 1
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    mixed_somewhere = False
    for key in range(12):
        with seeded_rngs(key):
            x, y = aug(images.clone(), labels)
        with seeded_rngs(key):
            x2, y2 = aug(images.clone(), labels)
        assert torch.equal(x, x2) and torch.equal(y, y2)  # same key, same augmentation
        assert y.shape == (8, 5) and (y >= 0).all()
        torch.testing.assert_close(y.sum(1), torch.ones(8))
        mixed_somewhere |= bool(((y > 0.1) & (y < 0.9)).any())
    assert mixed_somewhere
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])  # nobody else's randomness was consumed
    plain = BatchAugment(5, 0, 0, 1.0, 0.5, "batch", 0.1, 0, "pixel", 1)
    x, y = plain(images, labels)
    assert torch.equal(x, images)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert y[0, 0] == pytest.approx(1 - 0.1 + 0.1 / 5) and y[0, 1] == pytest.approx(0.1 / 5)


def test_ema_update_matches_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = make_ema(model, 0.9)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * old[k] + 0.1 * v)
    assert make_ema(model, None) is None


def test_randaugment_is_keyed_by_the_sample_seed():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    ra = SeededRandAugment("rand-m9-mstd0.5-inc1", 16)
    state = random.getstate()
    outs = [np.asarray(ra(img, seed)) for seed in range(6)]
    assert random.getstate() == state
    assert all(np.array_equal(np.asarray(ra(img, s)), outs[s]) for s in range(6))
    assert len({o.tobytes() for o in outs}) > 1
    with pytest.raises(LdaeError, match="aug.rand_augment"):
        SeededRandAugment("randaug-9", 16)
    # magnitude 10 posterizes to 0 bits: a black image (Pillow >= 13 refuses 0 bits; timm passes them on)
    (op,) = [o for o in SeededRandAugment("rand-m10-mstd0-inc1", 16).transform.ops if o.name == "PosterizeIncreasing"]
    op.prob = 1.0
    assert not np.asarray(op(img)).any()


def test_network_from_a_pretrain_checkpoint_is_the_folded_encoder(halves, pretrain_ckpt, tmp_path):
    cfg = config(halves, tmp_path, ckpt=str(pretrain_ckpt))
    model, kwargs, parents, init = stage.build_network(cfg, 2, stage.vit_arch(cfg))
    encoder, enc_kwargs, source = load_encoder(pretrain_ckpt)
    assert kwargs["depth"] == enc_kwargs["depth"] == 2 and kwargs["num_classes"] == 2
    assert parents == [source.parent_ref("init")] and not init["from_scratch"] and init["t"] == 10
    model.eval()
    encoder.eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        # the backbone computes the folded encoder's pooled features; a fresh LayerNorm and head follow
        torch.testing.assert_close(
            model.forward_head(model.forward_features(images), pre_logits=True),
            torch.nn.functional.layer_norm(encoder(images), (32,), eps=1e-6),
            atol=1e-5,
            rtol=1e-5,
        )
    assert model.head.weight.std() < 1e-4 and torch.equal(model.head.bias, torch.zeros(2))

    scratch_cfg = config(halves, tmp_path, ckpt=str(pretrain_ckpt), from_scratch=True)
    scratch, scratch_kwargs, scratch_parents, _ = stage.build_network(scratch_cfg, 2, stage.vit_arch(scratch_cfg))
    assert scratch_kwargs == kwargs and scratch_parents[0]["role"] == "architecture"
    assert torch.equal(scratch.pos_embed, model.pos_embed)  # the fixed sin-cos table both start from
    assert torch.equal(scratch.pos_embed[0], sincos_2d(32, (4, 4)))
    assert not torch.allclose(scratch.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)

    with pytest.raises(LdaeError, match="data.image_size=16"):
        stage.vit_arch(config(halves, tmp_path, ckpt=str(pretrain_ckpt), **{"data.image_size": 32}))


def test_tiny_run_learns_and_writes_its_records(run_main, halves, tmp_path):
    out = tmp_path / "run"
    # the loop itself (layer decay, warm-up + cosine, label smoothing, drop path, EMA, per-epoch eval);
    # mixup, RandAugment and erasing are tested above and in the resume test, and slow a 36-step run too much
    res = run_main(
        "finetune",
        "--from-scratch",
        "--config",
        "finetune/cifar10",
        *sum(
            (
                ["--set", s]
                for s in tiny(
                    halves,
                    out,
                    **{
                        "optim.epochs": 6,
                        "optim.lr": 3e-3,
                        "aug.mixup": 0,
                        "aug.cutmix": 0,
                        "aug.rand_augment": None,
                        "aug.erase_prob": 0,
                    },
                )
            ),
            [],
        ),
    )
    assert res.returncode == 0, res.stderr
    evals = [r for r in log(out) if "top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4, 5, 6]
    assert evals[0]["top1"] <= 70 and evals[-1]["top1"] >= 80 and evals[-1]["ema_top1"] >= 80  # chance is 50
    assert all(r["top5"] == 100 for r in evals)  # 2 classes: top-5 is top-2
    last = load_checkpoint(out / "checkpoint.safetensors", "finetune")
    best = load_checkpoint(out / "best.safetensors", "finetune")
    assert last.extra["finished"] and last.extra["init"]["from_scratch"] and last.extra["has_ema"]
    assert best.extra["best"]["top1"] == max(max(r["top1"], r["ema_top1"]) for r in evals)
    assert set(best.section("model")) == set(last.section("model")) and not best.section("optim")
    for name in ("ldae-config.yaml", "accuracy.png", "loss.png"):
        assert (out / name).is_file()


def test_resume_equals_the_uninterrupted_run(halves, pretrain_ckpt, tmp_path):
    """The whole recipe on (RandAugment, erasing, mixup/cutmix, drop path, EMA), stopped mid-epoch and resumed."""
    sets = {"optim.epochs": 2, "run.save_every": 100}
    full = config(halves, tmp_path / "full", ckpt=str(pretrain_ckpt), **sets)
    stage.run(full, "full")
    cut = config(halves, tmp_path / "cut", ckpt=str(pretrain_ckpt), **sets, **{"run.stop_after_steps": 4})
    stage.run(cut, "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors").extra["step"] == 4
    stage.main(None, [], {}, str(tmp_path / "cut"))
    a = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert a.extra["step"] == b.extra["step"] == 12
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name

    def timeless(run):
        return [{k: v for k, v in r.items() if k not in ("time_s", "img_per_s", "data_wait")} for r in log(run)]

    assert timeless(tmp_path / "full") == timeless(tmp_path / "cut")  # losses and evaluations, line for line
    assert b.provenance["parents"][0]["sha256"] == a.provenance["parents"][0]["sha256"]

    with pytest.raises(LdaeError, match="optim.layer_decay"):
        stage.main(None, ["optim.layer_decay=0.5"], {}, str(tmp_path / "cut"))
    with pytest.raises(LdaeError, match="already holds a finetune checkpoint"):
        stage.run(full, "full")


def test_one_line_errors(run_main, halves, tmp_path):
    res = run_main("finetune", "--config", "finetune/cifar10")
    assert res.returncode != 0 and "--ckpt" in res.stderr and "--from-scratch" in res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(LdaeError, match="optim.layer_decay"):
        load_config(stage.FinetuneConfig, "finetune/cifar10", ["optim.layer_decay=1.5"])
    with pytest.raises(LdaeError, match="micro-batch"):
        stage.run(config(halves, tmp_path / "odd", from_scratch=True, **{"optim.batch_size": 7}))


def test_two_ranks_under_torchrun(halves, pretrain_ckpt, tmp_path):
    """DDP on CPU (gloo): 2 ranks share the global batch, evaluation covers every val image once."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    sets = tiny(halves, out, **{"optim.epochs": 1, "aug.rand_augment": None})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29541",
        "-m",
        "ldae_cli",
        "finetune",
        "--config",
        "finetune/cifar10",
        "--ckpt",
        str(pretrain_ckpt),
        *sum((["--set", s] for s in sets), []),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    last = load_checkpoint(out / "checkpoint.safetensors", "finetune")
    assert last.extra["world_size"] == 2 and last.extra["finished"] and last.extra["step"] == 6
    evals = [x for x in log(out) if "top1" in x]
    assert len(evals) == 1 and 0 <= evals[0]["top1"] <= 100
    # 24 val images: accuracies are multiples of 1/24 only if each image was counted exactly once
    assert abs(evals[0]["top1"] * 24 / 100 - round(evals[0]["top1"] * 24 / 100)) < 1e-6


def test_from_scratch_without_an_image_size_settles_the_images_own(run_main, halves, tmp_path):
    """The default config leaves data.image_size null: from scratch it is the images' 16, as pretrain settles it."""
    sets = [s for s in tiny(halves, tmp_path / "run", **{"data.image_size": None, "model.arch.patch": 8})]
    res = run_main("finetune", "--from-scratch", "--dry-run", *sum((["--set", s] for s in sets), []))
    assert res.returncode == 0, res.stderr
    assert "data: image size 16 (native: median short side 16" in res.stdout
