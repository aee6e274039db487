"""The autoencoders `ldae train-tokenizer` learns (the paper's Sec. 4.1-4.2), and the losses that train them.

Three autoencoders share one interface (`Autoencoder`): images (B, 3, H, W) in [-1, 1] -> posterior
mean and log-variance as tokens (B, N, d) on the tokenizer's grid, and tokens -> images.

- `conv-vae`: an LDM-style convolutional VAE (ResNet blocks, GroupNorm, a self-attention mid block,
  `stride` = 2^(levels-1)). As in DiT, a token is a `token_group` x `token_group` square of latent
  positions, so one token covers stride*group pixels and holds group^2 * latent_channels values.
- `patch-vae`: a linear encoder/decoder on non-overlapping p x p patches with a KL term.
- `patch-ae`: the same without KL (its optimum spans the PCA subspace).

`tokenizers.TrainedTokenizer` wraps a trained, frozen autoencoder in the `Tokenizer` interface used by
pretrain and denoise.

The VQGAN-style losses are here too: a PatchGAN discriminator (hinge loss, LDM's adaptive weight is
in engine_tokenizer) and an LPIPS-style perceptual distance on VGG16 features whose weights the user
supplies (no pretrained network is downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import Attention
from torch import nn

from ldae_cli.errors import LdaeError
from ldae_cli.model.patches import patchify, unpatchify
from ldae_cli.settings.training import AutoencoderConfig as AutoencoderConfig  # re-exported where it was

KINDS = ("conv-vae", "patch-vae", "patch-ae")


# ---------------------------------------------------------------------------------------------
# Autoencoders
# ---------------------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """images <-> tokens; `variational` nets also return a log-variance to sample from."""

    spec: dict
    patch: int  # pixels per token side
    token_dim: int
    variational: bool

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean, logvar) tokens (B, N, d); logvar is None for a plain autoencoder."""
        raise NotImplementedError

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight: LDM's adaptive GAN weight balances gradient norms there."""
        raise NotImplementedError

    def grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch:
            raise LdaeError(
                f"data.image_size {image_size} is not divisible by the tokenizer's token footprint {self.patch} pixels"
            )
        return image_size // self.patch, image_size // self.patch

    def forward(
        self, images: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Training pass: (reconstruction, mean, logvar); `noise` (B, N, d) samples the posterior."""
        mean, logvar = self.posterior(images)
        z = mean if logvar is None or noise is None else mean + torch.exp(0.5 * logvar) * noise
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return self.decode_tokens(z, grid), mean, logvar


def _groups(channels: int) -> int:
    return math.gcd(32, channels)  # LDM uses 32 groups; narrow CPU-sized nets need a divisor


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map (LDM's mid block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.attn = Attention(channels, num_heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


def _mid(channels: int, attention: bool) -> nn.Sequential:
    layers: list[nn.Module] = [ResnetBlock(channels, channels)]
    if attention:
        layers.append(AttnBlock(channels))
    layers.append(ResnetBlock(channels, channels))
    return nn.Sequential(*layers)


class ConvVAE(Autoencoder):
    """LDM's KL autoencoder, trimmed: encoder -> (mean, logvar) map -> token_group^2 tokens -> decoder."""

    variational = True

    def __init__(
        self,
        stride: int,
        latent_channels: int,
        token_group: int,
        channels: int,
        channel_mult: list[int],
        res_blocks: int,
        attention: bool,
        kind: str = "conv-vae",
    ):
        super().__init__()
        self.spec = {
            "kind": kind,
            "stride": stride,
            "latent_channels": latent_channels,
            "token_group": token_group,
            "channels": channels,
            "channel_mult": list(channel_mult),
            "res_blocks": res_blocks,
            "attention": attention,
        }
        self.latent_channels, self.group = latent_channels, token_group
        self.patch, self.token_dim = stride * token_group, token_group * token_group * latent_channels
        widths = [channels * m for m in channel_mult]

        enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        cin = widths[0]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                enc.append(ResnetBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                enc.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        enc += [
            _mid(cin, attention),
            nn.GroupNorm(_groups(cin), cin, eps=1e-6),
            nn.SiLU(),
            nn.Conv2d(cin, 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1), _mid(widths[-1], attention)]
        cin = widths[-1]
        for level in reversed(range(len(widths))):
            for _ in range(res_blocks + 1):  # LDM's decoder has one block more per level than its encoder
                dec.append(ResnetBlock(cin, widths[level]))
                cin = widths[level]
            if level > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        dec += [nn.GroupNorm(_groups(cin), cin, eps=1e-6), nn.SiLU()]
        self.decoder = nn.Sequential(*dec)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def posterior(self, images):
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        # LDM's clamp: keeps exp(logvar) finite early in training
        return patchify(mean, self.group), patchify(logvar.clamp(-30.0, 20.0), self.group)

    def decode_tokens(self, tokens, grid):
        latent = unpatchify(tokens, self.group, grid, self.latent_channels)
        return self.conv_out(self.decoder(latent))

    @property
    def last_layer(self):
        return self.conv_out.weight


class PatchAutoencoder(Autoencoder):
    """Linear encoder and decoder on flattened p x p x 3 patches (the paper's U, V), with biases."""

    def __init__(self, patch: int, dim: int, kind: str):
        super().__init__()
        self.spec = {"kind": kind, "patch": patch, "dim": dim}
        self.patch, self.token_dim = patch, dim
        self.variational = kind == "patch-vae"
        full = patch * patch * 3
        self.encoder = nn.Linear(full, 2 * dim if self.variational else dim)
        self.decoder = nn.Linear(dim, full)

    def encode_patches(self, patches: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.encoder(patches)
        if self.variational:
            mean, logvar = h.chunk(2, dim=-1)
            return mean, logvar.clamp(-30.0, 20.0)
        return h, None

    def posterior(self, images):
        return self.encode_patches(patchify(images, self.patch))

    def decode_tokens(self, tokens, grid):
        return unpatchify(self.decoder(tokens), self.patch, grid)

    @property
    def last_layer(self):
        return self.decoder.weight


def build_autoencoder(spec: dict) -> Autoencoder:
    kind = spec.get("kind")
    if kind == "conv-vae":
        return ConvVAE(**spec)
    if kind in ("patch-vae", "patch-ae"):
        return PatchAutoencoder(**spec)
    raise LdaeError(f"unknown trained tokenizer kind {kind!r}; this ldae knows {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# VQGAN-style losses: PatchGAN discriminator, LPIPS-style perceptual distance
# ---------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN as VQGAN uses it: strided 4x4 convs with BatchNorm -> a map of real/fake logits."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # DCGAN init, as taming-transformers does
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16().features (LPIPS's taps)
VGG_TAPS = (3, 8, 15, 22, 29)
VGG_WIDTHS = (64, 128, 256, 512, 512)
VGG_FORMAT = (
    "a torchvision VGG16 state dict saved with safetensors (keys features.0.weight ... features.28.bias; "
    "classifier.* may be present and is ignored)"
)
LPIPS_FORMAT = "LPIPS's linear layers saved with safetensors (keys lin0.model.1.weight ... lin4.model.1.weight)"


def _read_safetensors(path: str, key: str, fmt: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LdaeError(f"{key}: {path} not found; expected {fmt}")
    try:
        return load_file(p)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LdaeError(
            f"{key}: {path} is not a readable safetensors file ({str(exc).splitlines()[0]}); expected {fmt}"
        ) from None


class PerceptualLoss(nn.Module):
    """LPIPS-style distance (Zhang et al. 2018): unit-normalised VGG16 features, squared differences,
    per-channel weights, spatial mean, summed over five layers.

    With `lpips_weights` the channel weights are LPIPS's learned linear layers; without, every channel
    weighs 1 (LPIPS's own `lpips=False` baseline). The VGG weights are required: no pretrained net
    exists on these machines and a random VGG would make the loss meaningless.
    """

    # LPIPS's ScalingLayer: maps [-1, 1] images to the input statistics the VGG was trained on
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    shift: torch.Tensor  # buffers
    scale_in: torch.Tensor

    def __init__(self, vgg_weights: str, lpips_weights: str | None = None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        state = _read_safetensors(vgg_weights, "loss.vgg_weights", VGG_FORMAT)
        # torchvision's vgg16().features without building its 120M-parameter classifier
        features = make_layers(cfgs["D"])[: VGG_TAPS[-1] + 1]
        wanted = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = [f"features.{k}" for k in features.state_dict() if f"features.{k}" not in wanted]
        if missing:
            raise LdaeError(f"loss.vgg_weights: {vgg_weights} lacks {', '.join(missing[:3])}; expected {VGG_FORMAT}")
        try:
            features.load_state_dict(
                {k[len("features.") :]: v for k, v in wanted.items() if int(k.split(".")[1]) <= VGG_TAPS[-1]}
            )
        except RuntimeError as exc:
            why = str(exc).splitlines()[-1].strip()
            raise LdaeError(
                f"loss.vgg_weights: {vgg_weights} does not fit VGG16 ({why}); expected {VGG_FORMAT}"
            ) from None
        self.features = features.eval().requires_grad_(False)
        if lpips_weights:
            lin = _read_safetensors(lpips_weights, "loss.lpips_weights", LPIPS_FORMAT)
            try:
                weights = [lin[f"lin{i}.model.1.weight"].reshape(w).float() for i, w in enumerate(VGG_WIDTHS)]
            except (KeyError, RuntimeError):
                raise LdaeError(
                    f"loss.lpips_weights: {lpips_weights} does not hold five linear layers of widths "
                    f"{VGG_WIDTHS}; expected {LPIPS_FORMAT}"
                ) from None
        else:
            weights = [torch.ones(w) for w in VGG_WIDTHS]
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w)
        self.register_buffer("shift", torch.tensor(self.SHIFT)[None, :, None, None])
        self.register_buffer("scale_in", torch.tensor(self.SCALE)[None, :, None, None])

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale_in
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image (B,) between images in [-1, 1]."""
        total = x.new_zeros(x.shape[0])
        for i, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            weight = getattr(self, f"lin{i}")[None, :, None, None]
            total = total + ((fx - fy).square() * weight).sum(1).mean((1, 2))
        return total
