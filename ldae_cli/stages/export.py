"""`ldae export`: the encoder folded at fixed t, as a plain timm ViT state dict (see pretrained.export_encoder)."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.pretrained import export_encoder


def main(ckpt: str, out: str, t: int, depth: int | None, ema: bool | None) -> Path:
    return export_encoder(ckpt, out, t, depth, ema)
