"""Run directories and the run settings every stage shares: where a run writes, how its config is loaded
or continued, the process group it runs in.

A stage opens a `session` for its run: the distributed context (torchrun or a world of one), the run
directory (a resumed run's own, else run.out_dir or runs/<kind>/<name>; never a directory that holds
another run's checkpoint) with the resolved config.yaml in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from ldae_cli.checkpoint import Checkpoint, load_checkpoint, sha256_file
from ldae_cli.config import load_config, save_resolved, to_dict
from ldae_cli.distributed import DistContext, init, shutdown
from ldae_cli.errors import LdaeError

CHECKPOINT = "checkpoint.safetensors"  # every training stage's resumable checkpoint, inside its run directory
# keys a resumed run may change: where things are and how they are run, not what is computed; stages add theirs
RESUMABLE = ("data.path", "data.num_workers", "data.cache", "data.on_bad_image", "run.device", "run.compile",
             "run.log_every", "run.save_every", "run.time_limit_minutes", "run.stop_after_steps", "run.progress",
             "run.out_dir")


@dataclass
class RunConfig:
    out_dir: Optional[str] = None  # default: runs/<stage>/<config name>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 20  # steps between metrics.jsonl lines (and the NaN check)
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    time_limit_minutes: Optional[float] = None  # stop cleanly (checkpoint written) after this long; resume later
    stop_after_steps: Optional[int] = None  # stop cleanly after this many steps of this invocation
    progress: bool = True


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resume_path(resume: str) -> Path:
    """--resume takes a run directory or its checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise LdaeError(f"--resume {resume}: no checkpoint there (expected a run directory holding {CHECKPOINT})")
    return path


def resume_base(stored: dict) -> dict:
    """The stored config to continue from, minus the limits of the interrupted invocation (give them again)."""
    return {**stored, "run": {**stored.get("run", {}), "stop_after_steps": None, "time_limit_minutes": None}}


def check_resume_config(stored: dict, current: dict, allowed: tuple[str, ...]) -> None:
    """A resumed run must continue the same recipe; only keys in `allowed` (paths, devices, logging) may change."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(stored), flat(current)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(allowed)]
    if changed:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4])
        raise LdaeError(f"--resume continues the stored run, but the config differs ({details}); resume without "
                        f"changing the recipe (only {', '.join(allowed)} may change) or start a new run directory")


def load_run_config(cls: type, kind: str, config: str | None, overrides: list[str], flags: dict[str, Any],
                    resume: str | None, resumable: tuple[str, ...] = ()) -> tuple[Any, Checkpoint | None]:
    """The config to run and, with --resume, the run's checkpoint: its stored recipe, of which only the
    RESUMABLE keys (and the stage's `resumable` ones) may change."""
    if resume is None:
        return load_config(cls, config, overrides, flags), None
    ckpt = load_checkpoint(resume_path(resume), kind)
    cfg = load_config(cls, config, overrides, flags, base=resume_base(ckpt.config))
    check_resume_config(ckpt.config, to_dict(cfg), RESUMABLE + resumable)
    return cfg, ckpt


def verified_parent(ck: Checkpoint, role: str, given: str | None = None) -> str:
    """The checkpoint `ck` was made from (its provenance entry with this role), at `given` or where the record
    says it was; read only when its sha256 is the recorded one, so a resumed run never reads other weights."""
    record = next((p for p in ck.provenance.get("parents", []) if p.get("role") == role), None)
    if record is None:
        raise LdaeError(f"{ck.path}: records no {role} checkpoint it was made from")
    path = given or record["path"]
    if not Path(path).is_file():
        raise LdaeError(f"{ck.path} was made from {record['path']}, which is not there any more; give its new "
                        f"location with --ckpt")
    if sha256_file(path) != record["sha256"]:
        raise LdaeError(f"{path} is not the {role} checkpoint {ck.path} was made from (sha256 differs from the "
                        f"recorded {record['sha256'][:12]}...); give the original with --ckpt")
    return str(path)


def run_dir(kind: str, out: str | None, name: str | None) -> Path:
    if out:
        return Path(out)
    return Path("runs") / kind / (Path(name).stem if name else "default")


def open_run_dir(command: str, kind: str, out: str | None, name: str | None, resume: Checkpoint | None) -> Path:
    """The run directory: the resumed checkpoint's, else run.out_dir or runs/<kind>/<name>, never a finished or
    running one (nothing already written is overwritten)."""
    if resume is not None and not out:
        return resume.path.parent
    path = run_dir(kind, out, name)
    if resume is None and (path / CHECKPOINT).exists():
        raise LdaeError(f"{path} already holds a {kind} checkpoint; continue it with `ldae {command} --resume "
                        f"{path}` or pick another run.out_dir (--out)")
    return path


@dataclass
class Session:
    """One invocation of a stage: its config, process group and run directory."""

    command: str  # the subcommand, for messages (`ldae <command> --resume ...`)
    kind: str  # the checkpoint kind it writes
    cfg: Any  # the stage's resolved config dataclass (with a `run: RunConfig` section)
    ctx: DistContext
    out_dir: Path
    resume: Checkpoint | None

    @property
    def run(self) -> RunConfig:
        return self.cfg.run

    @property
    def config(self) -> dict:
        return to_dict(self.cfg)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / CHECKPOINT


@contextlib.contextmanager
def session(command: str, kind: str, cfg: Any, name: str | None, resume: Checkpoint | None = None
            ) -> Iterator[Session]:
    ctx = init(cfg.run.device)
    try:
        out_dir = open_run_dir(command, kind, cfg.run.out_dir, name, resume)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, out_dir / "config.yaml")
        yield Session(command, kind, cfg, ctx, out_dir, resume)
    finally:
        shutdown(ctx)
