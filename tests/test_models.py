"""The model: adaLN-Zero structure, and the exact fold to a plain timm ViT at fixed t."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldae_cli.errors import LdaeError
from ldae_cli.model.models import SIZES, DenoisingViT, ModelConfig, build_model, build_timm_vit, fold_to_vit, sincos_2d
from ldae_cli.model.tokenizers import PCATokenizer, patchify
from ldae_cli.runs.checkpoint import read_metadata

REPO = Path(__file__).resolve().parent.parent


def randomize(model: torch.nn.Module, std: float = 0.05) -> None:
    """adaLN-Zero starts at zero (every block the identity), which would make fold tests vacuous."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


def test_adaln_zero_init_and_quarter_width_conditioning():
    m = DenoisingViT(48, 48, (4, 4), 64, 2, 1, 4)
    for block in m.blocks:
        hidden = block.ada.net[1]
        assert hidden.out_features == 16  # W/4
        assert block.ada.net[-1].weight.abs().sum() == 0
    assert m.final.linear.weight.abs().sum() == 0
    out = m(torch.randn(2, 16, 48), torch.tensor([3, 7]))
    assert torch.equal(out, torch.zeros_like(out))


def test_sizes_match_the_paper():
    assert SIZES["half-L"] == (1024, 12, 12, 16)
    cfg = ModelConfig(size="B")
    m = build_model(cfg, 16, 768, (16, 16))
    assert len(m.blocks) == 24 and m.encoder_depth == 12 and m.spec["width"] == 768
    with pytest.raises(LdaeError, match="custom"):
        ModelConfig(size="custom").resolved()


def test_position_embedding_is_fixed_sincos():
    pe = sincos_2d(64, (4, 4))
    assert pe.shape == (16, 64)
    m = DenoisingViT(8, 8, (4, 4), 64, 1, 1, 4)
    assert "pos_embed" not in m.state_dict()  # fixed, not learned
    assert torch.equal(m.pos_embed[0], pe)


def _pca(d=8, p=4):
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(p * p * 3, p * p * 3))
    return PCATokenizer(
        torch.randn(p * p * 3) * 0.1, basis.T.contiguous(), torch.rand(p * p * 3).sort(descending=True)[0], p, d
    )


@pytest.mark.parametrize("input_space", ["image", "latent"])
@pytest.mark.parametrize("depth", [None, 1])
def test_fold_matches_adaln_features(input_space, depth):
    tok = _pca()
    in_dim = tok.image_token_dim if input_space == "image" else tok.token_dim
    model = DenoisingViT(in_dim, 48, (8, 8), 64, 2, 2, 4, num_classes=5)
    randomize(model)
    model.eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = patchify(images, 4) if input_space == "image" else tok.encode(images)
    t = 10
    with torch.no_grad():
        expected = model.features(tokens, torch.full((3,), t), depth).mean(1)
    affine = (torch.eye(48), torch.zeros(48)) if input_space == "image" else tok.affine()
    state, kwargs = fold_to_vit(model, t, 4, affine, depth)
    vit = build_timm_vit(kwargs)
    vit.load_state_dict(state, strict=True)
    vit.eval()
    with torch.no_grad():
        got = vit(images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fold_depends_on_t():
    model = DenoisingViT(48, 48, (4, 4), 32, 1, 1, 2)
    randomize(model)
    a, _ = fold_to_vit(model, 10, 4, (torch.eye(48), torch.zeros(48)))
    b, _ = fold_to_vit(model, 500, 4, (torch.eye(48), torch.zeros(48)))
    assert not torch.allclose(a["blocks.0.norm1.weight"], b["blocks.0.norm1.weight"])


def test_export_cli_writes_a_state_dict_timm_loads_strictly(tmp_path):
    """End to end: a pretrain checkpoint -> `ldae export` -> plain safetensors -> timm, same features."""
    from ldae_cli.config import to_dict
    from ldae_cli.model.pretrained import load_pretrained
    from ldae_cli.runs.checkpoint import save_checkpoint
    from ldae_cli.stages.pretrain import PretrainConfig

    cfg = PretrainConfig()
    cfg.data.image_size = 32
    cfg.model.size, cfg.model.width, cfg.model.encoder_depth, cfg.model.decoder_depth = "custom", 64, 2, 2
    cfg.model.num_heads = 4
    tok = _pca()
    model = DenoisingViT(48, 48, (8, 8), 64, 2, 2, 4)
    randomize(model)
    tok_tensors, tok_desc = tok.export()
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"tokenizer.{k}": v for k, v in tok_tensors.items()},
    }
    extra = {"model_spec": model.spec, "tokenizer": tok_desc, "image_size": 32, "num_classes": 0, "has_ema": False}
    ckpt = save_checkpoint(tmp_path / "pre.safetensors", "pretrain", tensors, to_dict(cfg), extra=extra)
    out = tmp_path / "vit.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "ldae_cli", "export", "--ckpt", str(ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    meta = read_metadata(out)
    assert meta["kind"] == "encoder" and meta["extra"]["t"] == 10
    vit = build_timm_vit(meta["extra"]["timm_kwargs"])
    vit.load_state_dict(load_file(out), strict=True)
    vit.eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pre = load_pretrained(ckpt)
    with torch.no_grad():
        expected = pre.model.features(patchify(images, 4), torch.full((2,), 10)).mean(1)
        torch.testing.assert_close(vit(images), expected, atol=1e-5, rtol=1e-5)


def test_timm_form_export_loads_through_create_model_local_dir(pattern_tree, tmp_path, run_main):
    """`ldae export --format timm` -> a folder `timm.create_model("local-dir:...", pretrained=True)` loads by
    itself, computing the adaLN model's features at the fold t to 1e-5 from [-1, 1] images."""
    import timm
    from helpers import train_tiny

    from ldae_cli.model.pretrained import load_pretrained

    ckpt = train_tiny(
        "final.yaml",
        pattern_tree,
        tmp_path / "pre",
        **{"tokenizer.patch": 4, "tokenizer.dim": 8, "model.encoder_depth": 2, "optim.epochs": 2},
    )
    out = tmp_path / "ldae-vit"
    res = run_main("export", "--ckpt", str(ckpt), "--out", str(out), "--format", "timm")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".ldae-run.json", "README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert tuple(model.pretrained_cfg["mean"]) == (0.5,) * 3 and tuple(model.pretrained_cfg["input_size"]) == (
        3,
        32,
        32,
    )
    pre = load_pretrained(ckpt)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = pre.model.features(patchify(images, 4), torch.full((3,), 10)).mean(1)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    assert run_main("export", "--ckpt", str(ckpt), "--out", str(out), "--format", "timm").returncode == 1
