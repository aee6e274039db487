"""ldae's MoCo v3 (ldae_cli/model/mocov3.py) against the official facebookresearch/moco-v3 code, same inputs, same
weights: the official `moco/builder.py` MoCo_ViT is built around a bridge encoder (our DenoisingViT encoder at
constant t, mean-pooled, exposing the `head` Linear the official builder replaces), so the two differ only in the
code under test: MLP heads, InfoNCE loss, momentum encoder and its update, the cosine momentum schedule
(main_moco.py's adjust_moco_momentum) and, from vits.py, the 2-D sin-cos position embedding.

The official code is exported from the git mirror into a temporary folder and imported from there; the shims below
cover only timm/torch version differences (and `.cuda()` on a CPU-only machine). One process, a gloo group of one
(the official loss needs torch.distributed); the two-ranks-equal-one-process check is tests/test_mocov3.py's.

    PYTHONPATH=. python benchmarks/check_mocov3_official.py > benchmarks/results/mocov3-official.txt
"""

from __future__ import annotations

import argparse
import copy
import io
import subprocess
import sys
import tarfile
import tempfile
import types
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
from ldae_cli.model.mocov3 import MocoV3Objective, info_nce, momentum_at
from ldae_cli.model.models import DenoisingViT, sincos_2d
from ldae_cli.model.tokenizers import PixelTokenizer
from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.settings.training import DEFAULT_T, PretrainConfig

MIRROR = "/work/.mirror/facebookresearch+moco-v3/repo"
TOLERANCE = 1e-5  # float32: every difference below must be rounding only


def import_official(mirror: str, dest: Path):
    tar = subprocess.run(["git", f"--git-dir={mirror}", "archive", "HEAD"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(dest, filter="data")
    commit = subprocess.run(
        ["git", f"--git-dir={mirror}", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    # shims: timm moved to_2tuple and renamed num_tokens; the official loss puts its labels on .cuda()
    import timm.layers
    import timm.models.vision_transformer as timm_vit

    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules[helpers.__name__] = helpers
    timm_vit.VisionTransformer.num_tokens = property(lambda self: self.num_prefix_tokens)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(dest))
    argv, sys.argv = sys.argv, ["main_moco.py"]
    import main_moco
    import moco.builder
    import vits

    sys.argv = argv
    return commit, moco.builder, main_moco, vits


class Bridge(nn.Module):
    """The official base_encoder interface (a ViT whose `head` the builder swaps for the projector) around our
    encoder; the patch projection frozen as the official --stop-grad-conv1."""

    def __init__(self, net: DenoisingViT, timestep: int, num_classes: int):
        super().__init__()
        self.net, self.timestep = copy.deepcopy(net), timestep
        self.net.embed.requires_grad_(False)
        self.head = nn.Linear(net.spec["width"], num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = torch.full((tokens.shape[0],), self.timestep, dtype=torch.long)
        return self.head(self.net.features(tokens, t).mean(1))


def tiny_net() -> DenoisingViT:
    net = DenoisingViT(48, 48, (4, 4), 64, encoder_depth=2, decoder_depth=0, num_heads=4)
    with torch.no_grad():  # adaLN-Zero modulation starts at zero: make t matter (the objective opens the gates)
        for block in net.blocks:
            block.ada.net[-1].weight.normal_(0, 0.02)
    return net


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def grads_diff(ours: dict[str, nn.Parameter], theirs: dict[str, nn.Parameter]) -> tuple[float, float]:
    """(max |difference|, max |gradient|) over the parameters with a gradient (the same set on both sides)."""
    assert {k for k, p in ours.items() if p.grad is not None} == {k for k, p in theirs.items() if p.grad is not None}
    pairs = [(p.grad, theirs[k].grad) for k, p in ours.items() if p.grad is not None]
    return max(diff(a, b) for a, b in pairs), max(float(a.abs().max()) for a, _ in pairs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", default=MIRROR)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="moco-v3-"))
    commit, builder, main_moco, vits = import_official(args.mirror, tmp / "official")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    torch.manual_seed(0)
    # m0 0.9 on 8 steps: the momentum moves enough that an update one step off its schedule would show
    cfg = MocoV3Config(mlp_dim=128, dim=32, momentum=0.9)
    rows: list[tuple[str, float, float]] = []  # (what, max |difference|, scale: max |value| compared)

    def record(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        rows.append((what, diff(ours, theirs), float(theirs.abs().max())))

    denoiser = Denoiser(DiffusionConfig(), PixelTokenizer(4), NoiseSchedule(DiffusionConfig()), 16)
    ours = MocoV3Objective(PretrainConfig(objective="mocov3", mocov3=cfg), denoiser, tiny_net())
    theirs = builder.MoCo_ViT(partial(Bridge, ours.net, DEFAULT_T), cfg.dim, cfg.mlp_dim, cfg.temperature)
    theirs.base_encoder.head.load_state_dict(ours.heads["projector"].state_dict())
    theirs.momentum_encoder.head.load_state_dict(ours.heads["projector"].state_dict())
    theirs.predictor.load_state_dict(ours.heads["predictor"].state_dict())
    ours.train(), theirs.train()
    ours_params = {
        **{f"net.{k}": p for k, p in ours.net.named_parameters()},
        **{f"head.{k}": p for k, p in ours.heads["projector"].named_parameters()},
        **{f"predictor.{k}": p for k, p in ours.heads["predictor"].named_parameters()},
    }
    theirs_params = {k: p for k, p in theirs.base_encoder.named_parameters()}
    theirs_params.update({f"predictor.{k}": p for k, p in theirs.predictor.named_parameters()})
    assert {k for k, p in ours_params.items() if p.requires_grad} == {
        k for k, p in theirs_params.items() if p.requires_grad
    }

    # the heads on the same features; the loss on the same q, k (both halves, the 2 tau scale)
    h = torch.randn(32, 64)
    record("projector output", ours.heads["projector"](h), theirs.base_encoder.head(h))
    z = torch.randn(32, cfg.dim)
    record("predictor output", ours.heads["predictor"](z), theirs.predictor(z))
    q1, q2, k1, k2 = torch.randn(4, 32, cfg.dim).unbind()
    record("contrastive loss ctr(q, k)", info_nce(q1, k2, cfg.temperature).mean(), theirs.contrastive_loss(q1, k2))
    record(
        "symmetric loss ctr(q1,k2)+ctr(q2,k1)",
        (info_nce(q1, k2, cfg.temperature) + info_nce(q2, k1, cfg.temperature)).mean(),
        theirs.contrastive_loss(q1, k2) + theirs.contrastive_loss(q2, k1),
    )

    # full steps: forward (the official one updates its momentum encoder first), backward, SGD, momentum update
    total, per_epoch = 8, 2
    official_args = SimpleNamespace(epochs=total // per_epoch, moco_m=cfg.momentum)
    opt_ours = torch.optim.SGD([p for p in ours_params.values() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs_params.values() if p.requires_grad], lr=0.5)
    for k in range(args.steps):
        x1, x2 = torch.randn(2, 32, 16, 48).unbind()
        # both sides step from the same base weights: rounding drift of 1e-7 would otherwise carry a pre-activation
        # across a ReLU's kink now and then, where the gradient jumps (2e-3 at the 4th step when tried)
        with torch.no_grad():
            for n, p in ours_params.items():
                theirs_params[n].copy_(p)
        m = main_moco.adjust_moco_momentum(k / per_epoch, official_args)
        loss_theirs = theirs(x1, x2, m)
        loss_ours = ours.loss_from_tokens(x1, x2).mean()
        record(f"step {k}: loss", loss_ours, loss_theirs)
        if k:  # the official forward has just made the update ours made after the last optimizer step
            mom_ours = dict(ours.momentum.encoder.named_parameters())
            mom_ours.update({f"head.{n}": p for n, p in ours.momentum.projector.named_parameters()})
            mom_theirs = {n: p for n, p in theirs.momentum_encoder.named_parameters()}
            rows.append(
                (
                    f"step {k}: momentum weights (scale: |momentum - base|)",
                    max(diff(p, mom_theirs[n if n.startswith("head.") else f"net.{n}"]) for n, p in mom_ours.items()),
                    max(diff(p, b) for p, b in zip(*ours.ema_pairs())),
                )
            )
        loss_ours.backward(), loss_theirs.backward()
        head_keys = [n for n in ours_params if not n.startswith("net.")]
        rows.append(
            (
                f"step {k}: grad of the loss, head params",
                *grads_diff({n: ours_params[n] for n in head_keys}, {n: theirs_params[n] for n in head_keys}),
            )
        )
        enc_keys = [n for n in ours_params if n.startswith("net.")]
        rows.append(
            (
                f"step {k}: grad of the loss, encoder params",
                *grads_diff({n: ours_params[n] for n in enc_keys}, {n: theirs_params[n] for n in enc_keys}),
            )
        )
        assert ours.net.embed.weight.grad is None  # the frozen patch projection
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        ours.after_step(k, total)

    for k in range(total + 1):
        rows.append(
            (
                f"m(k={k}, K={total})",
                abs(momentum_at(k, total, cfg) - main_moco.adjust_moco_momentum(k / per_epoch, official_args)),
                momentum_at(k, total, cfg),
            )
        )
    stand_in = SimpleNamespace(patch_embed=SimpleNamespace(grid_size=(4, 4)), embed_dim=64, num_tokens=1)
    vits.VisionTransformerMoCo.build_2d_sincos_position_embedding(stand_in)
    record("2-D sin-cos position embedding (vits.py)", sincos_2d(64, (4, 4)), stand_in.pos_embed[0, 1:])

    print(f"ldae MoCo v3 vs facebookresearch/moco-v3 @ {commit}; torch {torch.__version__}, float32, CPU")
    print(f"{'what':<52} {'max |ours - official|':>22} {'scale (max |value|)':>20}")
    for what, d, scale in rows:
        print(f"{what:<52} {d:>22.3e} {scale:>20.3e}")
    worst = max(rows, key=lambda r: r[1])
    print(
        f"largest difference: {worst[1]:.3e} ({worst[0]}); tolerance {TOLERANCE:g}: "
        f"{'PASS' if worst[1] <= TOLERANCE else 'FAIL'}"
    )
    dist.destroy_process_group()
    return 0 if worst[1] <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
