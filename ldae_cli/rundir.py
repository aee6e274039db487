"""Run directories belong to one run: who may write into a directory, and what it may replace.

- A live run holds a lock file (pid, host, command) in its directory; a second process that wants the
  directory exits naming the holder. A lock whose process is gone (same host) is stale and is taken over.
- A new run starts only in a missing or empty directory (or one holding nothing but what a failed start
  leaves: config.yaml, a stale lock, temp files); anything else needs --force, which replaces an ldae run
  directory (and nothing else) as a whole.
- A resumed run writes only into the directory it resumes.
- Temp files a killed save left behind are removed when the run next starts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ldae_cli.errors import LdaeError

CHECKPOINT = "checkpoint.safetensors"  # every training stage's resumable checkpoint, inside its run directory
CONFIG = "config.yaml"
LOCK = ".ldae.lock"
METRICS = "metrics.jsonl"
TEMP_GLOB = ".*.tmp"  # checkpoint.save_checkpoint's temp files: .<name>.<random>.tmp beside the target
# what a failed start leaves, not worth keeping: a new run may start over it without --force
DISPOSABLE = (CONFIG, LOCK)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """The lock file of a run directory: created atomically (O_EXCL), removed when the run ends."""

    def __init__(self, directory: Path, command: str):
        self.path, self.command, self.held = directory / LOCK, command, False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"ldae {self.command}",
              "since": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise LdaeError(f"{self.path.parent}: could not take its lock {self.path}; another run keeps taking it")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - self.path.stat().st_mtime < 10:  # being written by a starting run
                raise LdaeError(f"{self.path.parent} is being opened by another run; try again in a moment") from None
            self.path.unlink(missing_ok=True)  # unreadable and old: a start killed while writing it
            return
        if host == socket.gethostname() and not pid_alive(pid):
            self.path.unlink(missing_ok=True)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise LdaeError(f"{self.path.parent} is in use by `{holder.get('command', 'ldae')}` (pid {pid} on {where}, "
                        f"since {holder.get('since', '?')}); wait for it to finish or pick another --out. If that "
                        f"process is gone (its machine crashed), delete {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def default_dir(kind: str, name: str | None) -> Path:
    return Path("runs") / kind / (Path(name).stem if name else "default")


def resolve(command: str, kind: str, out: str | None, name: str | None, resume_path: Path | None) -> Path:
    """Where the run writes: the resumed checkpoint's directory (--out may only repeat it), else --out
    (run.out_dir) or runs/<kind>/<name>."""
    if resume_path is not None:
        home = resume_path.parent
        if out and Path(out).resolve() != home.resolve():
            raise LdaeError(f"--resume continues the run in {home}, and a resumed run writes only there; --out {out} "
                            "names another directory (leave out --out)")
        return home
    path = Path(out) if out else default_dir(kind, name)
    if path.exists() and not path.is_dir():
        raise LdaeError(f"{path} is a file, not a run directory; pick another --out")
    return path


def claim_new(path: Path, command: str, kind: str, force: bool) -> None:
    """Make `path` (locked by us) ready for a new run: refuse what belongs to another run unless --force,
    which replaces an ldae run directory as a whole."""
    contents = sorted(p.name for p in path.iterdir() if p.name not in DISPOSABLE and not p.match(TEMP_GLOB))
    if not contents:
        return
    if not force:
        if CHECKPOINT in contents:
            raise LdaeError(f"{path} already holds a {kind} checkpoint; continue it with `ldae {command} --resume "
                            f"{path}`, pick another --out, or add --force to replace that run")
        raise LdaeError(f"{path} already holds {', '.join(contents[:4])}{' ...' if len(contents) > 4 else ''}; "
                        "pick another --out, or add --force to replace what is there")
    if not any(name in contents for name in (CHECKPOINT, METRICS)) and not (path / CONFIG).exists():
        raise LdaeError(f"--force replaces an ldae run directory, and {path} is not one (it holds "
                        f"{', '.join(contents[:4])}); pick another --out")
    for item in path.iterdir():
        if item.name == LOCK:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def remove_temp_files(directory: Path, name: str = "*") -> list[Path]:
    """Temp files of saves killed mid-write (`.<name>.<random>.tmp`), removed; only the run that owns the
    directory (or the target file) calls this, so none of them is being written."""
    removed = [p for p in directory.glob(f".{name}.*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def only_disposable(path: Path) -> bool:
    """Nothing in `path` but what a failed start writes (so it can go again)."""
    return all(p.name in DISPOSABLE or p.match(TEMP_GLOB) for p in path.iterdir())


def refuse_to_replace(path: Path, force: bool, what: str = "file") -> None:
    """Single-file outputs (PCA files, exported encoders, panels, reports) are never replaced without --force."""
    if path.exists() and not force:
        raise LdaeError(f"{path} already exists; pick another --out, or add --force to replace the {what}")
