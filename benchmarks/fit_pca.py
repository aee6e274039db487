"""Benchmark: ldae's streaming PCA fit against scikit-learn's IncrementalPCA on the same CIFAR-10 patches.

For each patch size, random p x p x 3 patches (images in [-1, 1], the layout of `ldae fit-pca`) are
sampled once from the CIFAR-10 training images; both methods then see the same patches in the same
batches:

  ldae     CovarianceAccumulator.update per batch (float64 Chan merge), then principal_components (eigh)
  sklearn  IncrementalPCA(n_components=D or d, batch_size=B).partial_fit per batch (incremental SVD)

Reported: wall time of each, the speed ratio, the principal angles between the top-d subspaces (max, in
degrees; also each against an exact float64 eigendecomposition of all the sampled patches) and the
agreement of the eigenvalues.

Timings are the best of `--repeats` runs with the same number of threads for both (`--threads`, default
1: torch intra-op threads and the BLAS pools numpy/scipy use, via threadpoolctl). On small shared
machines, spin-waiting BLAS/OpenMP pools oversubscribed by anything else running make multi-threaded
timings swing by 10-100x; one thread each keeps the comparison stable and fair.

    .venv/bin/python benchmarks/fit_pca.py                      # p = 4 and 8, 500,000 patches, d = 16
    .venv/bin/python benchmarks/fit_pca.py --patches 200000 --patch 4
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldae_cli.data.pipeline import DataConfig, build_dataset, to_unit_range  # noqa: E402
from ldae_cli.model.patches import random_patches  # noqa: E402
from ldae_cli.model.pca import CovarianceAccumulator, principal_components  # noqa: E402


def sample_patches(images: torch.Tensor, patch: int, count: int, per_image: int, seed: int) -> np.ndarray:
    """`count` random patches (float32, (row, col, channel) order) from uint8 images, as fit-pca samples them."""
    gen = torch.Generator().manual_seed(seed)
    n_images = -(-count // per_image)
    order = torch.cat([torch.randperm(len(images), generator=gen) for _ in range(-(-n_images // len(images)))])
    out = []
    for start in range(0, n_images, 256):
        idx = order[start : min(start + 256, n_images)]
        out.append(random_patches(to_unit_range(images[idx]), patch, per_image, gen))
    return torch.cat(out)[:count].numpy()


def best_of(repeats: int, fn, *args):
    """Run fn `repeats` times; return the shortest elapsed time with that run's results."""
    runs = [fn(*args) for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


def fit_ldae(x: np.ndarray, batch: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    acc = CovarianceAccumulator(x.shape[1])
    for start in range(0, len(x), batch):
        acc.update(torch.from_numpy(x[start : start + batch]))
    eigenvalues, basis = principal_components(acc.covariance())
    elapsed = time.perf_counter() - t0
    return elapsed, acc.mean.numpy(), basis.numpy(), eigenvalues.numpy()


def fit_sklearn(x: np.ndarray, batch: int, n_components: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.decomposition import IncrementalPCA

    t0 = time.perf_counter()
    ipca = IncrementalPCA(n_components=n_components, batch_size=batch)
    for start in range(0, len(x), batch):
        ipca.partial_fit(x[start : start + batch])
    elapsed = time.perf_counter() - t0
    return elapsed, ipca.mean_, ipca.components_, ipca.explained_variance_


def exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 covariance of all patches at once, numpy eigh: the reference both should match."""
    t = torch.from_numpy(x).double()
    mean = t.mean(0)
    c = t - mean
    cov = (c.T @ c / (len(t) - 1)).numpy()
    w, v = np.linalg.eigh(cov)
    return mean.numpy(), v[:, ::-1].T.copy(), w[::-1].copy()


def max_angle_deg(a: np.ndarray, b: np.ndarray, d: int) -> float:
    """Largest principal angle between the spans of the first d rows of a and b, in degrees."""
    from scipy.linalg import subspace_angles

    return float(np.degrees(subspace_angles(a[:d].T, b[:d].T).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, nargs="+", default=[4, 8], help="patch sizes p (D = 3 p^2)")
    ap.add_argument("--patches", type=int, default=500_000, help="random patches per patch size")
    ap.add_argument("--dim", type=int, default=16, help="kept components d compared")
    ap.add_argument("--batch", type=int, default=4096, help="patches per batch, the same for both methods")
    ap.add_argument("--per-image", type=int, default=16, help="patches sampled per image")
    ap.add_argument(
        "--ipca-components",
        choices=["full", "d", "both"],
        default="both",
        help="IncrementalPCA n_components: D (all), d, or run both",
    )
    ap.add_argument("--data", default=None, help="CIFAR-10 tree or .tar.gz (default: ldae's default locations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and BLAS (0: library defaults)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest is reported")
    args = ap.parse_args()
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # numpy/scipy BLAS (sklearn's SVDs) and OpenMP pools

    import sklearn

    print(
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}; batch {args.batch}, d = {args.dim}, "
        f"best of {args.repeats}"
    )
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(source="cifar10", path=args.data, image_size=32, num_workers=2), "train")
    images = ds.cached if ds.cached is not None else torch.stack([ds[i][0] for i in range(len(ds))])
    print(f"decoded {len(images):,} CIFAR-10 training images in {time.perf_counter() - t0:.1f} s")

    rows = []
    for p in args.patch:
        d_full = 3 * p * p
        d = min(args.dim, d_full)
        x = sample_patches(images, p, args.patches, args.per_image, args.seed)
        print(
            f"\n== p = {p}: {len(x):,} patches of D = {d_full} (float32, {x.nbytes / 2**20:.0f} MiB), "
            f"{-(-len(x) // args.batch)} batches"
        )
        ref_mean, ref_basis, ref_eig = exact(x)
        t_ours, mean, basis, eig = best_of(args.repeats, fit_ldae, x, args.batch)
        print(f"  ldae streaming (float64 Chan merge + eigh): {t_ours:7.2f} s")
        print(
            f"      vs exact: max angle top-{d} {max_angle_deg(basis, ref_basis, d):.2e} deg, "
            f"max rel eigenvalue error (all {d_full}) {np.max(np.abs(eig - ref_eig) / ref_eig):.1e}, "
            f"mean max abs diff {np.abs(mean - ref_mean).max():.1e}"
        )
        kinds = {"full": [d_full], "d": [d], "both": [d_full, d] if d != d_full else [d_full]}[args.ipca_components]
        for k in kinds:
            t_sk, sk_mean, sk_basis, sk_eig = best_of(args.repeats, fit_sklearn, x, args.batch, k)
            ratio = t_sk / t_ours
            angle = max_angle_deg(basis, sk_basis, d)
            eig_rel = np.abs(sk_eig[:d] - eig[:d]) / eig[:d]
            print(
                f"  sklearn IncrementalPCA(n_components={k}): {t_sk:7.2f} s  -> ldae is {ratio:.1f}x faster"
                if ratio >= 1
                else f"  sklearn IncrementalPCA(n_components={k}): {t_sk:7.2f} s  -> ldae is {1 / ratio:.1f}x slower"
            )
            print(
                f"      vs ldae:  max principal angle top-{d} {angle:.2e} deg, "
                f"top-{d} eigenvalues max rel diff {eig_rel.max():.1e}"
                + (
                    f", all {d_full}: {np.max(np.abs(sk_eig - eig) / np.maximum(eig, 1e-30)):.1e}"
                    if k == d_full
                    else ""
                )
            )
            print(
                f"      vs exact: max angle top-{d} {max_angle_deg(sk_basis, ref_basis, d):.2e} deg, "
                f"top-{d} eigenvalues max rel error {np.max(np.abs(sk_eig[:d] - ref_eig[:d]) / ref_eig[:d]):.1e}"
            )
            rows.append((p, d_full, k, t_ours, t_sk, ratio, angle, eig_rel.max()))
        print(f"  variance explained by d = {d}: {eig[:d].sum() / eig.sum():.4%}")

    print("\nsummary")
    print(
        f"{'p':>3} {'D':>4} {'ipca k':>7} {'ldae s':>8} {'sklearn s':>10} {'speedup':>8} {'max angle':>10} "
        f"{'eig rel':>8}"
    )
    for p, dd, k, t1, t2, r, ang, er in rows:
        print(f"{p:>3} {dd:>4} {k:>7} {t1:>8.2f} {t2:>10.2f} {r:>7.1f}x {ang:>9.1e}° {er:>8.1e}")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
