"""What each run of a study gets of the machine it runs on: its GPUs (CUDA_VISIBLE_DEVICES) or, on a CPU, its share
of the cores (torch threads), so that `--jobs` runs at once never share a device."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ldae_cli.errors import LdaeError


@dataclass
class Share:
    """What one child of a study gets of this machine: its environment and the same in words."""

    env: dict[str, str]
    text: str


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or by index)."""
    import torch

    count = torch.cuda.device_count()
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    return names[:count] if names else [str(i) for i in range(count)]


def shares(jobs: int, nproc: int) -> list[Share]:
    """One share per slot: `nproc` GPUs each where there are GPUs (refused when jobs x nproc exceed them), else the
    cores split so that jobs x threads <= cores (fewer threads where OMP_NUM_THREADS asks for fewer)."""
    gpus = visible_gpus()
    if gpus:
        if jobs * nproc > len(gpus):
            raise LdaeError(
                f"--jobs {jobs} x --nproc {nproc} needs {jobs * nproc} GPUs and this machine shows {len(gpus)} "
                f"({','.join(gpus)}); lower --jobs or --nproc"
            )
        return [
            Share({"CUDA_VISIBLE_DEVICES": ",".join(ids)}, f"GPU {','.join(ids)}")
            for ids in (gpus[slot * nproc : (slot + 1) * nproc] for slot in range(jobs))
        ]
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 0:
        threads = min(threads, int(asked))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [Share(env, f"{threads} of {cores} CPU cores") for _ in range(jobs)]
