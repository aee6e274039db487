"""Reading pretrain checkpoints back: the denoising model with its tokenizer and objective, and the
encoder folded at fixed t into a plain timm ViT (what probe, fine-tune and detection start from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from ldae_cli.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ldae_cli.config import config_from_dict
from ldae_cli.diffusion import Denoiser, NoiseSchedule
from ldae_cli.errors import LdaeError
from ldae_cli.models import DenoisingViT, build_timm_vit, fold_to_vit
from ldae_cli.tokenizers import Tokenizer, tokenizer_from_export

DEFAULT_T = 10


@dataclass
class Pretrained:
    ckpt: Checkpoint
    cfg: object  # PretrainConfig
    model: DenoisingViT
    tokenizer: Tokenizer
    denoiser: Denoiser

    @property
    def image_size(self) -> int:
        return self.ckpt.extra["image_size"]


def load_pretrained(path: str | Path, ema: bool | None = None) -> Pretrained:
    """ema: None = the EMA weights when the run kept them, else the raw weights."""
    from ldae_cli.stages.pretrain import PretrainConfig  # the stage owns its config schema

    ckpt = load_checkpoint(path, "pretrain")
    cfg = config_from_dict(PretrainConfig, ckpt.config)
    has_ema = ckpt.extra.get("has_ema", False)
    if ema and not has_ema:
        raise LdaeError(f"{path}: this run kept no EMA weights (optim.ema was null)")
    use_ema = has_ema if ema is None else ema
    model = DenoisingViT.from_spec(ckpt.extra["model_spec"])
    model.load_state_dict(ckpt.section("ema" if use_ema else "model"))
    model.eval()
    tokenizer = tokenizer_from_export(ckpt.section("tokenizer"), ckpt.extra["tokenizer"])
    denoiser = Denoiser(cfg.diffusion, tokenizer, NoiseSchedule(cfg.diffusion), ckpt.extra["image_size"])
    return Pretrained(ckpt, cfg, model, tokenizer, denoiser)


def pixel_affine(pre: Pretrained) -> tuple[torch.Tensor, torch.Tensor]:
    """Map from an image patch to the network's input token (folded into the ViT patch embedding)."""
    if pre.cfg.diffusion.input_space == "image":
        d = pre.tokenizer.image_token_dim
        return torch.eye(d), torch.zeros(d)
    if not pre.tokenizer.is_linear:
        raise LdaeError(f"{pre.ckpt.path}: the network reads latents of a non-linear '{pre.tokenizer.kind}' "
                        "tokenizer, which cannot be folded into a ViT patch embedding")
    return pre.tokenizer.affine()


def fold_encoder(pre: Pretrained, t: int = DEFAULT_T, depth: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    if not 0 <= t <= pre.denoiser.schedule.T:
        raise LdaeError(f"t must lie in 0..{pre.denoiser.schedule.T}, got {t}")
    return fold_to_vit(pre.model, t, pre.tokenizer.patch, pixel_affine(pre), depth)


def export_encoder(path: str | Path, out: str | Path, t: int = DEFAULT_T, depth: int | None = None,
                   ema: bool | None = None) -> Path:
    """Write the folded encoder as an `encoder` checkpoint whose tensors are a timm state dict."""
    pre = load_pretrained(path, ema)
    state, kwargs = fold_encoder(pre, t, depth)
    extra = {"timm_kwargs": kwargs, "t": t, "depth": kwargs["depth"], "image_size": pre.image_size,
             "class_names": pre.ckpt.extra.get("class_names", [])}
    return save_checkpoint(out, "encoder", state, pre.ckpt.config, [pre.ckpt.parent_ref("pretrain")], extra)


def load_encoder(path: str | Path, t: int = DEFAULT_T, depth: int | None = None, ema: bool | None = None,
                 **timm_overrides) -> tuple[VisionTransformer, dict, Checkpoint]:
    """A timm ViT from a pretrain checkpoint (folded now) or an exported encoder.

    Returns (vit, timm kwargs, source checkpoint) so callers can record provenance.
    """
    from ldae_cli.checkpoint import read_metadata

    kind = read_metadata(path)["kind"]
    if kind == "pretrain":
        pre = load_pretrained(path, ema)
        state, kwargs = fold_encoder(pre, t, depth)
        ckpt = pre.ckpt
    elif kind == "encoder":
        ckpt = load_checkpoint(path, "encoder")
        state, kwargs = ckpt.tensors, ckpt.extra["timm_kwargs"]
        if depth is not None and depth != kwargs["depth"]:
            raise LdaeError(f"{path}: exported with depth {kwargs['depth']}; export again with --depth {depth}")
    else:
        raise LdaeError(f"{path}: is a '{kind}' checkpoint, expected 'pretrain' or 'encoder'")
    vit = build_timm_vit(kwargs, **timm_overrides)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    allowed_missing = {k for k in missing if k.startswith("head")}
    if set(missing) - allowed_missing or unexpected:
        raise LdaeError(f"{path}: encoder weights do not fit the ViT (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    return vit, kwargs, ckpt
