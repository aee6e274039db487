"""The denoising network: a DiT-style ViT without class token, and its fold to a plain ViT.

Tokens (latent d or image D per token) -> Linear to width W -> fixed 2-D sin-cos position embedding
-> encoder blocks -> decoder blocks -> adaLN final layer -> Linear to the output token size. Every
block is a timm ViT block (timm's `Attention` on SDPA and `Mlp` with tanh-GELU) whose LayerNorms
have no affine; instead a per-block two-layer MLP of hidden width W/4 maps the conditioning vector
c (timestep embedding, plus a label embedding when class-conditioned) to shift/scale/gate vectors.
The last layers of those MLPs and of the output head start at zero (adaLN-Zero).

At a fixed t the conditioning is a constant, so each block is exactly a plain ViT block with
LayerNorm weight 1+scale and bias shift and its gates folded into attn.proj / mlp.fc2: `fold_to_vit`
writes that network as a state dict for timm's `VisionTransformer`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ldae_cli.errors import LdaeError

# the presets and shape checks the fine-tuning and detection backbones share, re-exported where they were
from ldae_cli.settings.training import SIZES as SIZES
from ldae_cli.settings.training import ModelConfig
from ldae_cli.settings.training import SizeName as SizeName
from ldae_cli.settings.training import check_shape as check_shape
from ldae_cli.settings.training import resolve_size as resolve_size


def sincos_2d(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (N, W): half the channels encode rows, half columns."""
    if width % 4:
        raise LdaeError(f"model.width {width} must be divisible by 4 for the 2-D sin-cos position embedding")
    gh, gw = grid
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )

    def embed(pos):
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequencies))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; index `num_classes` is the null label (dropped or unlabeled samples)."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.where(labels < 0, self.num_classes, labels)
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.table(labels)


class AdaLN(nn.Module):
    """Two-layer MLP c -> `chunks` modulation vectors; last layer zero-initialised (adaLN-Zero)."""

    def __init__(self, width: int, hidden: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, chunks * width))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(c).chunk(self.chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, ada_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=gelu_tanh)  # type: ignore[arg-type]  # factories work
        self.ada = AdaLN(width, ada_hidden, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int, ada_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = AdaLN(width, ada_hidden, 2)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))


class DenoisingViT(nn.Module):
    """tokens (B, N, in_dim), timesteps (B,), labels (B,) -> tokens (B, N, out_dim)."""

    spec: dict[str, Any]
    pos_embed: torch.Tensor  # a buffer

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        width: int,
        encoder_depth: int,
        decoder_depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        adaln_hidden_ratio: float = 0.25,
        num_classes: int = 0,
    ):
        super().__init__()
        self.spec = dict(
            in_dim=in_dim,
            out_dim=out_dim,
            grid=list(grid),
            width=width,
            encoder_depth=encoder_depth,
            decoder_depth=decoder_depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            adaln_hidden_ratio=adaln_hidden_ratio,
            num_classes=num_classes,
        )
        self.encoder_depth = encoder_depth
        ada_hidden = max(1, int(width * adaln_hidden_ratio))
        self.embed = nn.Linear(in_dim, width)
        self.register_buffer("pos_embed", sincos_2d(width, grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = LabelEmbedder(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(
            DiTBlock(width, num_heads, mlp_ratio, ada_hidden) for _ in range(encoder_depth + decoder_depth)
        )
        self.final = FinalLayer(width, out_dim, ada_hidden)
        self._init_weights()

    def _init_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for ada in (m for m in self.modules() if isinstance(m, AdaLN)):
            for p in ada.net[-1].parameters():
                nn.init.zeros_(p)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    @classmethod
    def from_spec(cls, spec: dict) -> "DenoisingViT":
        return cls(**{**spec, "grid": tuple(spec["grid"])})

    def condition(
        self, t: torch.Tensor, labels: torch.Tensor | None = None, drop_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.t_embed(t)
        if self.y_embed is not None:
            if labels is None:
                labels = torch.full_like(t, -1, dtype=torch.long)
            c = c + self.y_embed(labels, drop_labels)
        return c

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        drop_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.condition(t, labels, drop_labels)
        x = self.embed(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c)

    def features(
        self, tokens: torch.Tensor, t: torch.Tensor, depth: int | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token features after `depth` blocks (default: the encoder), conditioned on t, null label. `keep` (B, K):
        the grid positions `tokens` (B, K, in_dim) sit at, a subset of the grid (MAE's visible patches)."""
        depth = self.encoder_depth if depth is None else depth
        c = self.condition(t)
        pos = self.pos_embed if keep is None else self.pos_embed[0][keep]
        x = self.embed(tokens) + pos
        for block in self.blocks[:depth]:
            x = block(x, c)
        return x


def open_gates(net: DenoisingViT) -> None:
    """Every block's gates at 1 (not DiT's 0): at a constant t the encoder then starts as a plain ViT, as MAE's and
    MoCo v3's encoders do (objectives that train the encoder at one t)."""
    with torch.no_grad():
        for ada in (m for m in net.blocks.modules() if isinstance(m, AdaLN)):  # one per block
            ada.net[-1].get_parameter("bias").view(6, -1)[[2, 5]] = 1.0


def build_model(
    cfg: ModelConfig, in_dim: int, out_dim: int, grid: tuple[int, int], num_classes: int = 0
) -> DenoisingViT:
    width, enc, dec, heads = cfg.resolved()
    return DenoisingViT(
        in_dim,
        out_dim,
        grid,
        width,
        enc,
        dec,
        heads,
        cfg.mlp_ratio,
        cfg.adaln_hidden_ratio,
        num_classes if cfg.class_conditional else 0,
    )


# ---------------------------------------------------------------------------------------------
# Fold to a plain ViT at fixed t
# ---------------------------------------------------------------------------------------------


def timm_vit_kwargs(
    image_size: tuple[int, int], patch: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
) -> dict:
    """kwargs of timm's VisionTransformer for the encoder we train and fold: no class token, average pool,
    no final norm, tanh-GELU (DiT's blocks), no head (classifiers add theirs)."""
    return dict(
        img_size=tuple(image_size),
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        class_token=False,
        global_pool="avg",
        final_norm=False,
        fc_norm=False,
        num_classes=0,
        act_layer="gelu_tanh",
    )


def build_timm_vit(kwargs: dict, **overrides) -> VisionTransformer:
    """timm's VisionTransformer with exactly the structure `fold_to_vit` writes."""
    kw = {**kwargs, **overrides}
    if isinstance(kw.get("img_size"), list):
        kw["img_size"] = tuple(kw["img_size"])
    return VisionTransformer(**kw)


@torch.no_grad()
def fold_to_vit(
    model: DenoisingViT, t: int, patch: int, pixel_affine: tuple[torch.Tensor, torch.Tensor], depth: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict + kwargs of a timm ViT computing `model.features` at fixed t from clean images.

    pixel_affine (A, b): the tokenizer's map from an image patch vector (row, col, channel order) to
    the model's input token, z = A x + b (the PCA encode for latent-space input, identity for
    image-space input). It is folded into the patch embedding, so the ViT reads raw images.
    """
    depth = model.encoder_depth if depth is None else depth
    if not 1 <= depth <= len(model.blocks):
        raise LdaeError(f"depth {depth} is outside the model's 1..{len(model.blocks)} blocks")
    width = model.spec["width"]
    param = next(model.parameters())
    c = model.condition(torch.tensor([t], device=param.device))
    a, b = (x.to(param.device, torch.float32) for x in pixel_affine)
    weight = model.embed.weight.float() @ a  # (W, D)
    bias = model.embed.weight.float() @ b + model.embed.bias.float()
    sd = {
        "patch_embed.proj.weight": weight.reshape(width, patch, patch, -1).permute(0, 3, 1, 2),
        "patch_embed.proj.bias": bias,
        "pos_embed": model.pos_embed,
    }
    for i, block in enumerate(model.blocks[:depth]):
        assert isinstance(block, DiTBlock) and block.attn.qkv.bias is not None and block.mlp.fc1.bias is not None
        shift1, scale1, gate1, shift2, scale2, gate2 = (v[0] for v in block.ada(c))
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + scale1, shift1
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + scale2, shift2
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = block.attn.qkv.weight, block.attn.qkv.bias
        sd[p + "attn.proj.weight"] = gate1[:, None] * block.attn.proj.weight
        sd[p + "attn.proj.bias"] = gate1 * block.attn.proj.bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = block.mlp.fc1.weight, block.mlp.fc1.bias
        sd[p + "mlp.fc2.weight"] = gate2[:, None] * block.mlp.fc2.weight
        sd[p + "mlp.fc2.bias"] = gate2 * block.mlp.fc2.bias
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    spec = model.spec
    image_size = (spec["grid"][0] * patch, spec["grid"][1] * patch)
    return sd, timm_vit_kwargs(image_size, patch, width, depth, spec["num_heads"], spec["mlp_ratio"])


def model_flops_per_image(spec: dict, tokens: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs of one image through the network (x3 for forward + backward when training)."""
    n = tokens or spec["grid"][0] * spec["grid"][1]
    w, depth = spec["width"], spec["encoder_depth"] + spec["decoder_depth"]
    hidden = int(w * spec["mlp_ratio"])
    per_block = n * (4 * w * w + 2 * w * hidden) + 2 * n * n * w  # qkv+proj, mlp, scores+values
    macs = depth * per_block + n * w * (spec["in_dim"] + spec["out_dim"])
    return 2.0 * macs * (3 if training else 1)
