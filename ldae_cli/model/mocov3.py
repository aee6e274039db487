"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"; the official
facebookresearch/moco-v3) on the encoder every ldae evaluation reads: the DenoisingViT's input Linear, position
embedding and encoder blocks at the constant t = DEFAULT_T (MoCo has no timestep; trained and folded there, as MAE's),
mean-pooled over tokens (what `fold_to_vit`'s timm ViT outputs: average pool, no class token, no final norm), on raw
pixel patches (the pixel tokenizer). `MocoV3Objective` is the `mocov3` entry of model/objectives.py's registry.

Per step, for the global batch of B images:
- `draw_views` draws both views' parameters of every image from (seed, step) alone (`seeds.view_generator`): random
  resized crop, colour jitter, grey, blur, solarize and flip, BYOL's recipe as the official main_moco.py sets it;
  `apply_views` applies them on the device to the loader's uint8 images (torchvision's tensor ops), so an image's
  views do not depend on the rank count or a resume;
- the base encoder + projector + predictor give queries q1, q2; the momentum encoder + projector (an EMA copy,
  momentum m0 raised to 1 along a half cosine) give keys k1, k2 without gradient;
- the loss of image i is ctr(q1_i, k2) + ctr(q2_i, k1), ctr the InfoNCE cross-entropy against the keys of the whole
  global batch (all-gathered), times 2 tau as the official code scales it. Its mean over the global batch is the
  official loss, so the engine's per-rank sum / per-rank count under DDP's gradient average trains exactly it.
The MLP heads' BatchNorms take their statistics over the global batch when several ranks run (the official code's
SyncBatchNorm, which is CUDA-only; `GlobalBatchNorm1d` all-reduces sums with autograd, so gloo on CPUs works too).
The patch projection (the encoder's input Linear) stays at its random init, out of training (the paper's Sec. 4.2).
After each optimizer step the engine calls `after_step`: the momentum update.

Where it differs from the official code, and why:
- no class token, average pool (the encoder ldae folds and evaluates; the official ViT reads its class token);
- the blocks are the model's adaLN blocks at one t, tanh-GELU, gates opened to 1 (`open_gates`), with the model's
  xavier init (vits.py draws q, k and v's thirds of the fused qkv apart);
- the views are cut from the loader's image (whole, resized to data.image_size), not from the full-size file;
- images in [-1, 1], as every ldae encoder reads them (the official code normalises by ImageNet's mean and std);
- the MLP heads run in float32 outside autocast.
benchmarks/check_mocov3_official.py runs the official builder and schedule on the same weights and inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import nn

from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.model.diffusion import Denoiser
from ldae_cli.model.models import DenoisingViT, open_gates
from ldae_cli.model.objective_base import Objective
from ldae_cli.seeds import view_generator
from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig

# the two views' augmentation, as the official main_moco.py sets it (BYOL's recipe; jitter not strengthened)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GREY_P, FLIP_P = 0.8, 0.2, 0.5
BLUR_P = (1.0, 0.1)  # view 1, view 2
SOLARIZE_P = (0.0, 0.2)
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before its central fallback

# the columns of one view's parameter row
TOP, LEFT, HEIGHT, WIDTH, JITTER_ON, FACTORS, ORDER, GREY, BLUR, SIGMA, SOLARIZE, FLIP = (
    0,
    1,
    2,
    3,
    4,
    5,
    9,
    13,
    14,
    15,
    16,
    17,
)
PARAMS = 18
JITTER_OPS = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)


# ---------------------------------------------------------------------------------------------
# The views
# ---------------------------------------------------------------------------------------------


def crop_boxes(u: torch.Tensor, height: int, width: int, scale: Sequence[float]) -> torch.Tensor:
    """(..., 4 * CROP_TRIES) uniforms -> (..., 4) boxes (top, left, h, w): torchvision's RandomResizedCrop draw, the
    first of its tries that fits, else its central fallback."""
    u = u.reshape(*u.shape[:-1], CROP_TRIES, 4)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top, left = torch.floor(u[..., 2] * (height - h + 1)), torch.floor(u[..., 3] * (width - w + 1))
    tries = torch.stack([top, left, h, w], -1)
    first = fits.to(torch.uint8).argmax(-1, keepdim=True)[..., None].expand(*fits.shape[:-1], 1, 4)
    chosen = tries.gather(-2, first).squeeze(-2)
    ratio = width / height
    fh, fw = (
        (round(width / CROP_RATIO[0]), width)
        if ratio < CROP_RATIO[0]
        else (height, round(height * CROP_RATIO[1]))
        if ratio > CROP_RATIO[1]
        else (height, width)
    )
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=u.dtype)
    return torch.where(fits.any(-1, keepdim=True), chosen, fallback)


def draw_views(cfg: MocoV3Config, seed: int, step: int, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """The parameters of both views of every image of a step's global batch: (batch, 2, PARAMS) float64 on the CPU,
    from (seed, step) alone. Row i belongs to the step's i-th image whatever the ranks and micro-batches."""
    gen = view_generator(seed, step)
    u = torch.rand(batch, 2, 4 * CROP_TRIES + 14, generator=gen, dtype=torch.float64)
    r = u[..., 4 * CROP_TRIES :]
    p = torch.zeros(batch, 2, PARAMS, dtype=torch.float64)
    p[..., TOP : WIDTH + 1] = crop_boxes(u[..., : 4 * CROP_TRIES], *size, cfg.crop_scale)
    p[..., JITTER_ON] = (r[..., 0] < JITTER_P).double()
    for i, strength in enumerate(JITTER):  # ColorJitter's factor ranges: [1-s, 1+s], hue [-s, s]
        lo, hi = (-strength, strength) if i == 3 else (max(0.0, 1 - strength), 1 + strength)
        p[..., FACTORS + i] = lo + (hi - lo) * r[..., 1 + i]
    p[..., ORDER : ORDER + 4] = r[..., 5:9].argsort(-1).double()  # ColorJitter's random order of its four ops
    p[..., GREY] = (r[..., 9] < GREY_P).double()
    p[..., BLUR] = (r[..., 10] < torch.tensor(BLUR_P, dtype=torch.float64)).double()
    p[..., SIGMA] = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * r[..., 11]
    p[..., SOLARIZE] = (r[..., 12] < torch.tensor(SOLARIZE_P, dtype=torch.float64)).double()
    p[..., FLIP] = (r[..., 13] < FLIP_P).double()
    return p


def blur_kernel(cfg: MocoV3Config) -> int:
    """Odd kernel size covering +-3 sigma of the largest blur (PIL's GaussianBlur, the official one, has no cut-off)."""
    return 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1


def one_view(image: torch.Tensor, p: list[float], kernel: int) -> torch.Tensor:
    """One uint8 (3, H, W) image -> its view, the official order: crop, jitter, grey, blur, solarize, flip."""
    top, left, h, w = (int(v) for v in p[TOP : WIDTH + 1])
    x = tvf.resized_crop(image, top, left, h, w, list(image.shape[-2:]), antialias=True)
    if p[JITTER_ON]:
        for op in p[ORDER : ORDER + 4]:
            x = JITTER_OPS[int(op)](x, p[FACTORS + int(op)])
    if p[GREY]:
        x = tvf.rgb_to_grayscale(x, num_output_channels=3)
    if p[BLUR]:
        x = tvf.gaussian_blur(x, [kernel, kernel], [p[SIGMA], p[SIGMA]])
    if p[SOLARIZE]:
        x = tvf.solarize(x, SOLARIZE_THRESHOLD)
    if p[FLIP]:
        x = tvf.horizontal_flip(x)
    return x


def apply_views(images: torch.Tensor, params: torch.Tensor, kernel: int) -> torch.Tensor:
    """uint8 (n, 3, H, W) images and their (n, 2, PARAMS) rows -> uint8 (2n, 3, H, W): the n first views, then the
    n second views."""
    rows = params.tolist()
    return torch.stack([one_view(images[i], rows[i][v], kernel) for v in range(2) for i in range(len(rows))])


# ---------------------------------------------------------------------------------------------
# Global-batch statistics under DDP
# ---------------------------------------------------------------------------------------------


def spans_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks; its gradient is the sum of every rank's gradient (each rank's loss reads
    the sum), which is what makes the global-batch statistics differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics (and running averages) are those of the global batch when several
    ranks run: SyncBatchNorm's result on any backend. Two passes (mean, then centred squares) keep float32 exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and spans_ranks()):
            return super().forward(x)
        sums = SumOverRanks.apply(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        var = SumOverRanks.apply((x - mean).square().sum(0)) / count
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is not None and running_mean is not None and running_var is not None:  # track_running_stats
            with torch.no_grad():
                tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1 / float(tracked)
                running_mean.lerp_(mean, factor)
                running_var.lerp_(var * count / (count - 1), factor)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def build_mlp(layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The official MLP head: Linear (no bias) -> BN -> ReLU for the hidden layers, then Linear -> BN without
    affine (SimCLR's last BN, gamma removed)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            mods += [GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True)]
        else:
            mods.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per query: the cross-entropy of its cosine logits / tau against the keys of the global batch (gathered from
    every rank without gradient, as the official concat_all_gather), its own key the positive, times 2 tau."""
    q, k = nnf.normalize(q, dim=1), nnf.normalize(k.detach(), dim=1)
    offset = 0
    if spans_ranks():
        parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, k.contiguous())
        offset, k = dist.get_rank() * k.shape[0], torch.cat(parts)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return nnf.cross_entropy(logits, labels, reduction="none") * (2 * temperature)


def momentum_at(step: int, total_steps: int, cfg: MocoV3Config) -> float:
    """m(k) = 1 - (1 - m0) (cos(pi k / K) + 1) / 2 (the official adjust_moco_momentum), or m0 without the schedule."""
    if not cfg.momentum_cosine:
        return cfg.momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * (1.0 - cfg.momentum)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def encoder_parts(net: DenoisingViT) -> list[nn.Module]:
    """What the encoder path reads: input Linear, timestep embedding, blocks (no label embedding, no decoder blocks:
    a mocov3 config has neither)."""
    return [net.embed, net.t_embed, net.blocks]


class Momentum(nn.Module):
    """The momentum encoder and projector: frozen copies of the base ones (the net's unused denoising head left
    out of the encoder's), which `MocoV3Objective.after_step` moves towards them."""

    def __init__(self, net: DenoisingViT, projector: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(net)
        del self.encoder.final  # the copy only runs `features`
        self.projector = copy.deepcopy(projector)
        self.requires_grad_(False)


class MocoV3Objective(Objective):
    """The `mocov3` objective: draw = both views' parameters of every image (B, 2, PARAMS); forward = per-sample loss.

    `net` is the base encoder every evaluation reads at DEFAULT_T; its denoising head and, with freeze_patch_embed,
    its input Linear are frozen (out of DDP and AdamW). Saved beside it under `mocov3`: the heads (their BatchNorm
    statistics too) and the momentum encoder and projector, which `after_step` updates."""

    def __init__(self, cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT):
        super().__init__(cfg, denoiser, net)
        self.cfg = cfg.mocov3
        self.kernel = blur_kernel(self.cfg)
        net.final.requires_grad_(False)
        if self.cfg.freeze_patch_embed:
            net.embed.requires_grad_(False)
        open_gates(net)
        width, mlp, dim = net.spec["width"], self.cfg.mlp_dim, self.cfg.dim
        self.heads = nn.ModuleDict(
            {
                "projector": build_mlp(self.cfg.proj_layers, width, mlp, dim),
                "predictor": build_mlp(self.cfg.pred_layers, dim, mlp, dim),
            }
        )
        self.momentum = Momentum(net, self.heads["projector"])

    def draw(self, seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor]:
        """The step's view parameters for the global batch (rows sliced per rank like any draw)."""
        size = (self.denoiser.image_size,) * 2
        return (draw_views(self.cfg, seed, step, batch, size).to(device),)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {"mocov3": nn.ModuleDict({"heads": self.heads, "momentum": self.momentum})}

    def param_groups(self, weight_decay: float) -> list[nn.Parameter]:
        """The base encoder (its patch projection aside) and both heads, all decayed (the official AdamW)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        pixels = to_unit_range(apply_views(images, views, self.kernel)).float()
        x1, x2 = self.denoiser.tokenizer.encode(pixels).chunk(2)
        return self.loss_from_tokens(x1, x2)

    def pooled(self, net: DenoisingViT, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, in_dim) -> (B, width): the net's encoder at DEFAULT_T averaged over tokens (what the folded
        ViT outputs)."""
        t = torch.full((tokens.shape[0],), DEFAULT_T, dtype=torch.long, device=tokens.device)
        amp = self.denoiser.amp_dtype
        with torch.autocast(tokens.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return net.features(tokens, t).mean(1).float()

    def loss_from_tokens(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Per-sample loss from both views' tokens. The encoders run on both views at once (their LayerNorms are
        per token); the heads run view by view, so each BatchNorm sees one view's batch, as in the official code."""
        tokens = torch.cat([x1, x2])
        h1, h2 = self.pooled(self.net, tokens).chunk(2)
        proj, pred = self.heads["projector"], self.heads["predictor"]
        q1, q2 = pred(proj(h1)), pred(proj(h2))
        with torch.no_grad():
            m1, m2 = self.pooled(self.momentum.encoder, tokens).chunk(2)
            k1, k2 = self.momentum.projector(m1), self.momentum.projector(m2)
        tau = self.cfg.temperature
        return info_nce(q1, k2, tau) + info_nce(q2, k1, tau)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(base, momentum) parameters in matching order: encoder path, then projector."""
        base = [*encoder_parts(self.net), self.heads["projector"]]
        mom = [*encoder_parts(self.momentum.encoder), self.momentum.projector]
        return [p for m in base for p in m.parameters()], [p for m in mom for p in m.parameters()]

    @torch.no_grad()
    def net_loaded(self) -> None:
        """The base encoder took another run's weights (--init-from): the momentum encoder starts as it."""
        for base, mom in zip(*self.ema_pairs()):
            mom.copy_(base)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step of `step`: momentum <- m * momentum + (1 - m) * base with m = m(step + 1), the
        update the official loop makes at the start of iteration step + 1 (its first, at k = 0, copies equal
        weights and changes nothing)."""
        m = momentum_at(step + 1, total_steps, self.cfg)
        base, mom = self.ema_pairs()
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, base, alpha=1.0 - m)
