"""ldae's MAE objective against facebookresearch/mae's own models_mae.py: same weights, images and masking noise.

The official code is read at run time from a git mirror (never copied into ldae): models_mae.py and util/pos_embed.py
are extracted with `git archive` into a temporary folder and imported from there. Each case builds ldae's MAE
objective (configs/baselines/mae.yaml's settings at the case's size), sets every parameter to random values, copies
the weights into MaskedAutoencoderViT (the encoder as `fold_to_vit` writes it at t = 10: patch embedding,
position embedding, blocks), and runs both on the same uint8 images (as [-1, 1] floats) and the same noise.

Compared: the masking (ids_restore, the mask), the patches and their norm_pix targets, the encoder output on the
visible patches (before and after the encoder's LayerNorm), the decoder's prediction and the loss.

Shims, all here and none in ldae:
- the class token: ldae's encoder has none (average pool, MAE's appendix A.1), so models_mae.py's class-token
  lines are edited out of forward_encoder / forward_decoder (each edit must match the source exactly once; the
  edits are printed as a diff);
- the encoder blocks' MLP activation set to tanh-GELU, the one ldae's blocks (DiT's) use; the decoder keeps MAE's
  exact GELU on both sides;
- timm >= 0.9's Block takes no `qk_scale` (always None in models_mae.py) and numpy >= 1.24 has no `np.float`;
- the torch.rand in random_masking returns the noise ldae draws for the step (`MAEObjective.draw`);
- the fixed sin-cos embeddings are copied from ldae's (they are models_mae.py's with the row and column halves
  swapped: the script checks that too).

    python benchmarks/mae_official.py [--mirror /work/.mirror/facebookresearch+mae/repo] \\
        [--out docs/mae-official-check.txt]
"""

from __future__ import annotations

import argparse
import difflib
import io
import subprocess
import sys
import tarfile
import tempfile
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from ldae_cli.config import load_config
from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
from ldae_cli.model.mae import MAEObjective
from ldae_cli.model.models import build_model, fold_to_vit
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig

MIRROR = "/work/.mirror/facebookresearch+mae/repo"
ROOT = Path(__file__).resolve().parent.parent

# models_mae.py without its class token: (the official line, what it becomes)
NO_CLS_TOKEN = [
    ("        cls_token = self.cls_token + self.pos_embed[:, :1, :]\n", ""),
    ("        cls_tokens = cls_token.expand(x.shape[0], -1, -1)\n", ""),
    ("        x = torch.cat((cls_tokens, x), dim=1)\n", ""),
    ("ids_restore.shape[1] + 1 - x.shape[1]", "ids_restore.shape[1] - x.shape[1]"),
    ("x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)", "x_ = torch.cat([x, mask_tokens], dim=1)"),
    ("        x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token\n", "        x = x_\n"),
    ("        x = x + self.decoder_pos_embed\n", "        x = x + self.decoder_pos_embed[:, 1:, :]\n"),
    ("        x = x[:, 1:, :]\n", ""),
]

CASES = [  # (name, image size, patch, width, depth, heads, decoder width, depth, heads, batch)
    ("tiny, 32 px / 4", 32, 4, 64, 2, 4, 32, 2, 4, 8),
    ("ViT-B/16, 224 px (mae.yaml)", 224, 16, 768, 12, 12, 512, 8, 16, 2),
]


def official_modules(mirror: str, folder: Path) -> tuple[object, object, str]:
    """models_mae (class token edited out) and util.pos_embed imported from `folder`; and the edit as a diff."""
    archive = subprocess.run(
        ["git", "--git-dir", mirror, "archive", "HEAD", "models_mae.py", "util/pos_embed.py"],
        check=True,
        capture_output=True,
    ).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder)
    commit = subprocess.run(
        ["git", "--git-dir", mirror, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    source = (folder / "models_mae.py").read_text()
    edited = source
    for old, new in NO_CLS_TOKEN:
        assert edited.count(old) == 1, f"models_mae.py at {commit} differs from what this script edits: {old!r}"
        edited = edited.replace(old, new)
    (folder / "models_mae.py").write_text(edited)
    diff = "".join(
        difflib.unified_diff(
            source.splitlines(True), edited.splitlines(True), "models_mae.py", "models_mae.py (no class token)", n=0
        )
    )
    (folder / "util" / "__init__.py").touch()
    sys.path.insert(0, str(folder))
    if not hasattr(np, "float"):
        np.float = float  # numpy >= 1.24 dropped the alias util/pos_embed.py uses
    import models_mae
    from timm.models.vision_transformer import Block
    from util import pos_embed

    models_mae.Block = lambda *args, qk_scale=None, **kwargs: Block(*args, **kwargs)  # timm >= 0.9: no qk_scale
    return models_mae, pos_embed, f"official commit {commit}\n{diff}"


def ldae_mae(case, norm_pix: bool) -> tuple[MAEObjective, float]:
    """ldae's MAE objective with mae.yaml's settings at the case's size, every parameter random."""
    _, size, patch, width, depth, heads, dwidth, ddepth, dheads, _ = case
    sets = {
        "data.image_size": size,
        "tokenizer.patch": patch,
        "model.size": "custom",
        "model.width": width,
        "model.encoder_depth": depth,
        "model.decoder_depth": 0,
        "model.num_heads": heads,
        "mae.decoder_width": dwidth,
        "mae.decoder_depth": ddepth,
        "mae.decoder_heads": dheads,
        "mae.norm_pix_loss": norm_pix,
    }
    cfg = load_config(PretrainConfig, "baselines/mae.yaml", [f"{k}={v}" for k, v in sets.items()])
    denoiser = Denoiser(cfg.diffusion, PixelTokenizer(patch), NoiseSchedule(cfg.diffusion), size)
    torch.manual_seed(0)
    objective = MAEObjective(cfg, denoiser, build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid))
    with torch.no_grad():  # away from the init (adaLN-Zero weights, LayerNorms at 1 and 0): every term matters
        for p in objective.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return objective.eval(), cfg.mae.mask_ratio


def official_mae(models_mae, objective: MAEObjective, case) -> nn.Module:
    """MaskedAutoencoderViT of the case's size holding ldae's weights (the encoder folded at t = DEFAULT_T)."""
    _, size, patch, width, depth, heads, dwidth, ddepth, dheads, _ = case
    official = models_mae.MaskedAutoencoderViT(
        img_size=size,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        decoder_embed_dim=dwidth,
        decoder_depth=ddepth,
        decoder_num_heads=dheads,
        mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=objective.norm_pix,
    )
    for block in official.blocks:
        block.mlp.act = nn.GELU(approximate="tanh")
    folded, _ = fold_to_vit(objective.net, DEFAULT_T, patch, objective.denoiser.tokenizer.affine())
    dec = objective.decoder
    state = {
        "patch_embed.proj.weight": folded["patch_embed.proj.weight"],
        "patch_embed.proj.bias": folded["patch_embed.proj.bias"],
        **{k: v for k, v in folded.items() if k.startswith("blocks.")},
        **{f"norm.{k}": v for k, v in dec.norm.state_dict().items()},
        **{f"decoder_embed.{k}": v for k, v in dec.embed.state_dict().items()},
        "mask_token": dec.mask_token.detach(),
        **{f"decoder_{k}": v for k, v in dec.blocks.state_dict(prefix="blocks.").items()},
        **{f"decoder_norm.{k}": v for k, v in dec.out_norm.state_dict().items()},
        **{f"decoder_pred.{k}": v for k, v in dec.pred.state_dict().items()},
    }
    missing, unexpected = official.load_state_dict(state, strict=False)
    assert set(missing) == {"cls_token", "pos_embed", "decoder_pos_embed"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        official.pos_embed[:, 1:] = folded["pos_embed"]
        official.decoder_pos_embed[:, 1:] = dec.pos_embed
    return official.eval()


def sincos_check(pos_embed, width: int, grid: int) -> float:
    """Largest difference between models_mae.py's sin-cos table and ldae's with its row and column halves swapped."""
    from ldae_cli.model.models import sincos_2d

    theirs = torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(width, grid)).float()
    ours = sincos_2d(width, (grid, grid))
    return (theirs - torch.cat([ours[:, width // 2 :], ours[:, : width // 2]], 1)).abs().max().item()


def compare(models_mae, case, norm_pix: bool) -> dict[str, tuple[float, float]]:
    """{what: (largest absolute difference, largest absolute value)} of ldae's objective and models_mae.py's."""
    objective, mask_ratio = ldae_mae(case, norm_pix)
    official = official_mae(models_mae, objective, case)
    batch = case[-1]
    images = torch.randint(
        0, 256, (batch, 3, case[1], case[1]), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    (noise,) = objective.draw(seed=0, step=7, batch=batch, device=torch.device("cpu"))
    imgs = to_unit_range(images).float()
    captured = {}
    official.blocks[-1].register_forward_hook(lambda m, i, o: captured.update(pre_norm=o))
    with torch.no_grad(), mock.patch.object(torch, "rand", lambda *a, **k: noise.clone()):
        ours = objective.reconstruct(images, noise)
        our_loss = objective(images, None, noise).mean()
        latent, mask, ids_restore = official.forward_encoder(imgs, mask_ratio)
        pred = official.forward_decoder(latent, ids_restore)
        loss = official.forward_loss(imgs, pred, mask)
        loss_whole, _, _ = official(imgs, mask_ratio=mask_ratio)
        our_latent_normed = objective.decoder.norm(ours["latent"])
    target = official.patchify(imgs)
    exact = lambda a, b: (float((a != b).sum()), float(b.numel()))  # noqa: E731 (differing entries, entries)
    diff = lambda a, b: ((a - b).abs().max().item(), b.abs().max().item())  # noqa: E731
    return {
        "ids_restore (entries differing)": exact(ours["ids_restore"], ids_restore),
        "mask (entries differing)": exact(ours["mask"], mask),
        "patches": diff(ours["patches"], target),
        "encoder, visible tokens, before its norm": diff(ours["latent"], captured["pre_norm"]),
        "encoder, visible tokens, after its norm": diff(our_latent_normed, latent),
        "decoder prediction": diff(ours["pred"], pred),
        "loss (forward_loss)": diff(our_loss, loss),
        "loss (MaskedAutoencoderViT.forward)": diff(our_loss, loss_whole),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirror", default=MIRROR, help="a git directory of facebookresearch/mae")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mae-official-check.txt"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        models_mae, pos_embed, edit = official_modules(args.mirror, Path(tmp))
        lines = [
            f"ldae MAE vs facebookresearch/mae models_mae.py, torch {torch.__version__}, float32 on CPU",
            edit.rstrip(),
            "",
            f"sin-cos tables, models_mae.py's vs ldae's halves swapped: largest difference "
            f"{sincos_check(pos_embed, 768, 14):.3g} (768 wide, 14 x 14), "
            f"{sincos_check(pos_embed, 512, 14):.3g} (512 wide)",
        ]
        worst = 0.0
        for case in CASES:
            for norm_pix in (True, False):
                lines.append(f"\n{case[0]}, batch {case[-1]}, norm_pix_loss {norm_pix}:")
                for what, (d, scale) in compare(models_mae, case, norm_pix).items():
                    lines.append(f"  {what:<42} {d:10.3g}   (of {scale:.3g})")
                    if "differing" not in what:
                        worst = max(worst, d / max(scale, 1e-12))
                    else:
                        assert d == 0, (case, what, d)
        lines.append(f"\nlargest difference relative to the compared values' largest magnitude: {worst:.3g}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
