"""The run settings every stage shares and the session a stage runs in: how its config is loaded or
continued, its process group, its run directory.

A stage opens a `session` for its run: the distributed context (torchrun or a world of one) and the
run directory (a resumed run's own, else run.out_dir or runs/<kind>/<name>), locked for this run and
holding the resolved config.yaml (ownership rules: rundir.py). A start that fails before writing
anything of value leaves no directory behind.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from ldae_cli import rundir
from ldae_cli.checkpoint import Checkpoint, load_checkpoint, sha256_file, stored_config
from ldae_cli.config import load_config, save_resolved, to_dict
from ldae_cli.distributed import DistContext, init, shutdown
from ldae_cli.errors import LdaeError
from ldae_cli.reporting import console, note_kept
from ldae_cli.rundir import CHECKPOINT
# keys a resumed run may change: where things are and how they are run, not what is computed; stages add theirs
RESUMABLE = ("data.path", "data.num_workers", "data.cache", "data.on_bad_image", "run.device", "run.compile",
             "run.log_every", "run.save_every", "run.time_limit_minutes", "run.stop_after_steps", "run.progress",
             "run.out_dir", "run.tensorboard", "run.wandb")


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
    progress: bool = True  # a progress bar on a terminal, plain log lines when output goes to a file
    tensorboard: bool = True  # event files in <run>/tensorboard: every logged scalar, pictures at each save
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE=online)

    def validate(self) -> None:
        if self.log_every < 1 or self.save_every < 1:
            raise LdaeError(f"run.log_every and run.save_every are numbers of steps (1 or more), got "
                            f"{self.log_every} and {self.save_every}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise LdaeError(f"run.stop_after_steps must be 1 or more (or null), got {self.stop_after_steps}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise LdaeError(f"run.time_limit_minutes must be positive (or null), got {self.time_limit_minutes}")
        if self.seed < 0:
            raise LdaeError(f"run.seed must be >= 0, got {self.seed}")


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
    """The stored config to continue from, minus the limits of the interrupted invocation (give them again) and
    its directory (a resumed run writes where its checkpoint is now, wherever the stored config says it was)."""
    return {**stored, "run": {**stored.get("run", {}), "stop_after_steps": None, "time_limit_minutes": None,
                              "out_dir": None}}


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
    stored_config(cls, ckpt)  # the stored recipe must read as this ldae's config before anything overrides it
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
def session(command: str, kind: str, cfg: Any, name: str | None, resume: Checkpoint | None = None,
            force: bool = False) -> Iterator[Session]:
    out_dir = rundir.resolve(command, kind, cfg.run.out_dir, name, resume.path if resume is not None else None)
    ctx = init(cfg.run.device)
    lock = rundir.RunLock(out_dir, command)
    created = not out_dir.exists()
    try:
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if resume is None:
                rundir.claim_new(out_dir, command, kind, force)
            litter = rundir.remove_temp_files(out_dir)
            if litter:
                console.print(f"removed {len(litter)} temp file(s) an interrupted save left in {out_dir}")
            if resume is None or not (out_dir / rundir.CONFIG).exists():  # a resumed run keeps its start's record
                save_resolved(cfg, out_dir / rundir.CONFIG)
        note_kept(f"the checkpoint of step {resume.extra.get('step')} in {out_dir} (continue with `ldae {command} "
                  f"--resume {out_dir}`)" if resume is not None else None)
        yield Session(command, kind, cfg, ctx, out_dir, resume)
    except BaseException:
        if ctx.is_main and lock.held and rundir.only_disposable(out_dir):  # a failed start: leave nothing
            lock.release()
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                (out_dir / rundir.CONFIG).unlink(missing_ok=True)
        raise
    finally:
        lock.release()
        shutdown(ctx)
