"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"; facebookresearch/mae's models_mae.py)
trained on the encoder every evaluation reads: the DenoisingViT's input Linear, position embedding and encoder
blocks, on raw pixel patches (the pixel tokenizer).

One step, per image: argsort of uniform noise (drawn for the global batch from the step's keyed generator, so ranks
and resumes see the same masks) shuffles the patches; the first int(N (1 - mask_ratio)) are kept, the encoder sees
only those (at their own positions); a lighter decoder (the encoder output's LayerNorm, a Linear to its width, a
learnt mask token at every hidden position, its own sin-cos position embedding, timm ViT blocks, LayerNorm, Linear to
pixels) predicts every patch; the loss is the MSE on the hidden patches of the per-patch normalised pixels
(norm_pix_loss).

Where it differs from models_mae.py, and why:
- no class token, as the encoder ldae folds and evaluates (average pool; MAE's appendix A.1: it works as well);
- the encoder blocks are the model's adaLN blocks at one constant t (DEFAULT_T): at a fixed t each is a plain ViT
  block (fold_to_vit), with tanh-GELU; their gates start at 1 (not DiT's 0) so the encoder starts as MAE's does;
- the encoder's final LayerNorm (MAE's `norm`) is the decoder's first layer, so the folded encoder has none, as an
  l-DAE one (MAE's fine-tuning drops it too, for its global pool);
- images in [-1, 1], as every ldae encoder reads them (MAE normalises by ImageNet's mean and std);
- the sin-cos embeddings put rows before columns (models_mae.py's helper puts columns first): a fixed channel order.
benchmarks/mae_official.py runs models_mae.py itself on the same weights, images and noise.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay
from torch import nn

from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model.diffusion import Denoiser
from ldae_cli.model.models import DenoisingViT, open_gates, sincos_2d
from ldae_cli.model.objective_base import Objective
from ldae_cli.seeds import step_generator
from ldae_cli.settings.training import DEFAULT_T, MAEConfig, PretrainConfig

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class MAEDecoder(nn.Module):
    """Visible tokens' encoder features (B, K, W) + where every patch went (ids_restore) -> pixels of every patch."""

    pos_embed: torch.Tensor  # a buffer

    def __init__(self, width: int, grid: tuple[int, int], patch_dim: int, cfg: MAEConfig, mlp_ratio: float):
        super().__init__()
        dim = cfg.decoder_width
        self.norm = LayerNorm(width)
        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)  # type: ignore[arg-type]  # timm calls any factory
            for _ in range(cfg.decoder_depth)
        )
        self.out_norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        for module in self.modules():  # MAE's init: xavier-uniform Linears, zero biases (LayerNorms 1 and 0 already)
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.norm(latent))
        b, n = ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(b, n - x.shape[1], -1)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1])) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.out_norm(x))


def masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep (B, keep), ids_restore (B, N), mask (B, N): 1 where hidden) from noise (B, N): MAE's argsort of
    noise, the patches of the `keep` smallest values kept."""
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle[:, :keep], ids_restore, (ids_restore >= keep).float()


def masked_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Per-image MSE over the hidden patches (B,); norm_pix: of the patches normalised by their own mean and
    (unbiased) variance, as models_mae.py's forward_loss."""
    target = patches
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).square().mean(-1)
    return (per_patch * mask).sum(1) / mask.sum(1)


class MAEObjective(Objective):
    """The `mae` objective: draw = the masking noise (B, N); forward = per-image loss."""

    def __init__(self, cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT):
        super().__init__(cfg, denoiser, net)
        self.norm_pix = cfg.mae.norm_pix_loss
        n = denoiser.grid[0] * denoiser.grid[1]
        self.keep = int(n * (1 - cfg.mae.mask_ratio))  # models_mae.py's count
        if not 1 <= self.keep < n:
            raise LdaeError(
                f"mae.mask_ratio {cfg.mae.mask_ratio} keeps {self.keep} of the {n} patches of an image; "
                f"the encoder needs one or more and the loss one hidden patch or more"
            )
        self.decoder = MAEDecoder(
            net.spec["width"], denoiser.grid, denoiser.tokenizer.image_token_dim, cfg.mae, net.spec["mlp_ratio"]
        )
        net.final.requires_grad_(False)  # the denoising head has no part in MAE: DDP and AdamW leave it out
        open_gates(net)

    def draw(self, seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor]:
        n = self.denoiser.grid[0] * self.denoiser.grid[1]
        return (torch.rand((batch, n), generator=step_generator(seed, step, device), device=device),)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"mae": self.decoder}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """MAE's AdamW groups: no weight decay on biases and LayerNorm-like vectors."""
        return param_groups_weight_decay(self, weight_decay)

    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage of a step, for the loss and for checks against models_mae.py: the patches, the masking, the
        encoder features of the visible patches and the decoder's prediction of every patch."""
        patches = self.denoiser.tokenizer.encode(to_unit_range(images).float())
        ids_keep, ids_restore, mask = masking(noise, self.keep)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        t = torch.full((len(images),), DEFAULT_T, device=images.device)
        amp = self.denoiser.amp_dtype
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            latent = self.net.features(visible, t, keep=ids_keep)
            pred = self.decoder(latent, ids_restore)
        return {
            "patches": patches,
            "ids_keep": ids_keep,
            "ids_restore": ids_restore,
            "mask": mask,
            "latent": latent.float(),
            "pred": pred.float(),
        }

    def forward(self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.reconstruct(images, noise)
        return masked_loss(out["pred"], out["patches"], out["mask"], self.norm_pix)
