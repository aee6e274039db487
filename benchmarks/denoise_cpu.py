"""CPU time of `ldae denoise` for a B-size model at 256x256, against the bare network forward, in one run.

The denoise step is: uint8 -> [-1, 1], PCA encode, latent noise, inverse PCA, the network (12 + 12
blocks at width 768, 256 tokens), the prediction turned back into an image. Also printed: the fp32
matmul rate this machine reaches on the network's largest product, which with the model's FLOPs
gives the floor no fp32 implementation can beat here.

    python benchmarks/denoise_cpu.py [--batch 8] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import synthetic_pca, trained_like  # noqa: E402
from timing import best_of  # noqa: E402

from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule  # noqa: E402
from ldae_cli.model.models import ModelConfig, build_model, model_flops_per_image  # noqa: E402
from ldae_cli.model.pretrained import Pretrained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    diffusion = DiffusionConfig()
    tokenizer = synthetic_pca(16, 32)
    denoiser = Denoiser(diffusion, tokenizer, NoiseSchedule(diffusion), 256)
    model = trained_like(build_model(ModelConfig(size="B"), denoiser.in_dim, denoiser.out_dim, denoiser.grid)).eval()
    pre = Pretrained(None, None, diffusion, model, tokenizer, denoiser)
    b = args.batch
    images = torch.rand(b, 3, 256, 256) * 2 - 1
    tokens = torch.randn(b, 256, denoiser.in_dim)
    t = pre.timestep()
    with torch.inference_mode():
        pre.denoise(images[:1], t, 0)  # warm-up
        full = best_of(lambda: pre.denoise(images, t, 0)) / b
        bare = best_of(lambda: model(tokens, torch.full((b,), t))) / b
        a, w = torch.randn(b * 256, 768), torch.randn(768, 3072)
        matmul = best_of(lambda: a @ w, 5)
    peak = 2 * a.shape[0] * 768 * 3072 / matmul
    flops = model_flops_per_image(model.spec, training=False)
    print(
        f"threads {torch.get_num_threads()}, batch {b}, "
        f"B-size model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), 256 tokens, "
        f"{flops / 1e9:.1f} GFLOP per image"
    )
    print(f"denoise (full step)   {full:.3f} s/image")
    print(f"bare network forward  {bare:.3f} s/image   ratio full/bare {full / bare:.3f}")
    print(f"fp32 matmul rate      {peak / 1e9:.0f} GFLOP/s -> floor {flops / peak:.3f} s/image")


if __name__ == "__main__":
    main()
