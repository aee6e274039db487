"""Folders ldae writes into belong to the user unless ldae can prove it wrote them.

- Proof of ownership: when ldae starts a run (or an export folder, or a prepared dataset) in a folder it
  writes a marker, `.ldae-run.json`, with a run id and the manifest of every file and folder it writes
  there, each recorded before it is written. `--force` removes what the manifest lists and nothing else;
  a folder holding anything else is refused, naming those files. `.`, the home directory and a filesystem
  root are never replaced. Ownership is judged on the folder a path resolves to (a `runs -> /scratch` link
  stays usable); inside it, symlinks are removed as links and never followed.
- Run folders written before the marker existed still resume (the marker is added then), and `--force`
  replaces one only when every file in it is one ldae writes and its checkpoint reads as ldae's.
- A live run holds `.ldae.lock` (pid, host, command) under an exclusive flock: of several processes that
  want a folder at once exactly one gets it, and a lock whose process died is released by the kernel.
- Temp files a killed save left behind are removed when the run next starts.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from ldae_cli.errors import LdaeError

RUNS = Path("runs")  # where outputs go when no --out names a place
CHECKPOINT = "checkpoint.safetensors"  # every training stage's resumable checkpoint, inside its run directory
CONFIG = "ldae-config.yaml"  # the resolved config of a run, under a name of ldae's (a user's config.yaml is theirs)
LOCK = ".ldae.lock"
MARKER = ".ldae-run.json"
METRICS = "metrics.jsonl"
TEMP_GLOB = ".*.tmp"  # temp files of atomic writes: .<name>.<random>.tmp beside the target
BOOKKEEPING = (LOCK, MARKER)
TRAINING_COMMANDS = ("pretrain", "probe", "finetune", "train-tokenizer", "detect")
# what runs written before the marker existed hold: a folder of nothing else (with a checkpoint ldae reads) is
# such a run, and --force may replace it
LEGACY_OUTPUTS = {"config.yaml", CHECKPOINT, METRICS, "pca.safetensors", "loss.png", "accuracy.png", "report.png",
                  "results.json", "eval.json", "best.safetensors", "coco_eval.txt", "load_report.json",
                  "reconstructions.png", "report.json", "tensorboard", "wandb"}
LEGACY_PREFIXES = ("eval-only-", "coco_eval-only-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a kill leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunLock:
    """The lock file of a folder, held under an exclusive flock for as long as the run lives.

    The flock is what excludes: the kernel grants it to one process and drops it when that process dies, so
    a stale lock is taken over by whoever flocks it next, atomically. The file's text (pid, host, command)
    names the holder in messages. A lock written on another host is respected (its process cannot be
    checked from here) until someone deletes it."""

    def __init__(self, directory: Path, command: str):
        self.path, self.command = directory / LOCK, command
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"ldae {self.command}",
              "since": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    self._refuse(self._holder() or {})
                raise
            if not self._same_file(fd):  # its holder released (unlinked) it between our open and our flock
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder and not self._stale(holder):
                os.close(fd)
                self._refuse(holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise LdaeError(f"{self.path.parent}: could not take its lock {self.path}; other runs keep taking it")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            return None  # torn by a start killed while writing it: nobody holds it (we have the flock)
        return holder if isinstance(holder, dict) else None

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        """A holder whose lock we could flock: gone, unless it is a live process of this host (an ldae from before
        locks were flocked) or of another host (which cannot be checked from here)."""
        try:
            pid, host = int(holder["pid"]), str(holder["host"])
        except (KeyError, TypeError, ValueError):
            return True
        return host == socket.gethostname() and (pid == os.getpid() or not pid_alive(pid))

    def _refuse(self, holder: dict) -> None:
        host = str(holder.get("host", "?"))
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise LdaeError(f"{self.path.parent} is in use by `{holder.get('command', 'ldae')}` (pid {holder.get('pid', '?')} "
                        f"on {where}, since {holder.get('since', '?')}); wait for it to finish or pick another --out. If "
                        f"that process is gone (its machine crashed), delete {self.path}")

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before closing: a waiter that opened this file sees it is gone
            os.close(self.fd)
            self.fd = None


class Manifest:
    """The marker of a folder ldae owns: its run id and every entry (file or folder) ldae writes there, recorded
    before it is written. Only the process holding the folder's lock changes it."""

    def __init__(self, directory: Path, data: dict):
        self.directory, self.data = directory, data

    @property
    def files(self) -> set[str]:
        return set(self.data.get("files", []))

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        """The folder's marker; None when it has none (or one that does not read as ldae's)."""
        try:
            data = json.loads((directory / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or \
                not isinstance(data.get("files"), list):
            return None
        return cls(directory, data)

    @classmethod
    def create(cls, directory: Path, command: str, files: set[str] = frozenset()) -> "Manifest":
        manifest = cls(directory, {"format": 1, "run_id": uuid.uuid4().hex, "command": f"ldae {command}",
                                   "created": _dt.datetime.now().isoformat(timespec="seconds"), "files": []})
        manifest.add(*files)
        if not files:
            manifest.save()
        return manifest

    def add(self, *names: str) -> None:
        new = [n for n in names if n not in self.files]
        if new:
            self.data["files"] = sorted(self.files | set(new))
            self.save()

    def discard(self, *names: str) -> None:
        if self.files & set(names):
            self.data["files"] = sorted(self.files - set(names))
            self.save()

    def save(self) -> None:
        write_atomically(self.directory / MARKER, (json.dumps(self.data, indent=1) + "\n").encode())


def entries(path: Path) -> list[str]:
    """What a folder holds besides ldae's bookkeeping (lock, marker) and temp files of interrupted writes."""
    return sorted(p.name for p in path.iterdir() if p.name not in BOOKKEEPING and not p.match(TEMP_GLOB))


def remove_entry(path: Path) -> None:
    """Delete one file or folder; a symlink is removed as a link, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def protected(path: Path) -> str | None:
    """Why `path` may never be replaced wholesale: the working directory, the home directory or a root."""
    real = path.resolve()
    if real == Path.cwd().resolve():
        return "it is the current directory"
    if real == Path.home().resolve():
        return "it is the home directory"
    if real.parent == real:
        return "it is a filesystem root"
    return None


def legacy_run(path: Path, names: list[str]) -> bool:
    """A run written before the marker existed: only files ldae writes, and a checkpoint that reads as ldae's."""
    from ldae_cli.checkpoint import read_metadata

    if CHECKPOINT not in names or not all(n in LEGACY_OUTPUTS or n.startswith(LEGACY_PREFIXES) for n in names):
        return False
    try:
        read_metadata(path / CHECKPOINT)
    except LdaeError:
        return False
    return True


def listing(names: list[str] | set[str], limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def decide(path: Path, command: str, force: bool, keep: set[str] = frozenset(), restartable=None,
           replaces: tuple[str, ...] | None = None, kind: str = "run's") -> tuple[str, list[str]]:
    """What a new start in the existing folder `path` does, without touching it: ("empty" | "restart" | "replace",
    our entries it removes); refusals are raised. See `claim`."""
    names = [n for n in entries(path) if n not in keep]
    manifest = Manifest.read(path)
    if not names:
        return "empty", []
    if manifest is not None:
        ours, foreign = [n for n in names if n in manifest.files], [n for n in names if n not in manifest.files]
        written_by = str(manifest.data.get("command", "")).removeprefix("ldae ")
        if not foreign and restartable is not None and restartable(path):
            return "restart", ours
        if force and written_by not in (replaces or TRAINING_COMMANDS):
            raise LdaeError(f"{path} holds what `ldae {written_by}` wrote; `ldae {command} --force` does not replace "
                            "it; pick another --out")
    else:
        legacy = legacy_run(path, names) and command in TRAINING_COMMANDS
        ours, foreign = (names, []) if legacy else ([], names)
    if not force:
        if CHECKPOINT in names:
            raise LdaeError(f"{path} already holds a {kind} checkpoint; continue it with `ldae {command} --resume {path}`"
                            f" (or add --continue), pick another --out, or add --force to replace that run")
        raise LdaeError(f"{path} already holds {listing(names)}; pick another --out"
                        + (", or add --force to replace what ldae wrote there" if not foreign else ""))
    why = protected(path)
    if why:
        raise LdaeError(f"--force never empties {path}: {why}; pick another --out")
    if foreign:
        raise LdaeError(f"--force replaces only what ldae wrote, and {path} also holds {listing(foreign)}, which ldae "
                        "did not write; move them away or pick another --out")
    return "replace", ours


def claim(path: Path, command: str, force: bool, keep: set[str] = frozenset(), restartable=None,
          replaces: tuple[str, ...] | None = None, kind: str = "run's") -> Manifest:
    """Make `path` (locked by us, existing) ready for a new run or output folder and return its manifest.

    An empty folder (but for `keep`, e.g. the user's config file that --config named) is marked as ours. A
    folder of ours (marker) whose `restartable(path)` says it holds the same run, killed before its first
    checkpoint, is cleared of our files and started again. Anything else needs --force, which removes only
    our files and refuses when the folder holds any other. `replaces`: the commands whose folders --force may
    replace (default: the training stages'), so that an export never replaces a run, nor a run a dataset."""
    action, ours = decide(path, command, force, keep, restartable, replaces, kind)
    if action == "restart":
        manifest = Manifest.read(path)
        clear(path, ours, manifest)
        return manifest
    for name in ours:
        remove_entry(path / name)
    return Manifest.create(path, command)


def clear(path: Path, names: list[str], manifest: Manifest) -> None:
    """Remove our entries `names` of `path` and forget them."""
    for name in names:
        remove_entry(path / name)
    manifest.discard(*names)


def adopt(path: Path, command: str) -> Manifest:
    """The manifest of a run being resumed; a run written before the marker existed gets one now, listing the
    files ldae writes that it holds."""
    manifest = Manifest.read(path)
    if manifest is None:
        names = [n for n in entries(path) if n in LEGACY_OUTPUTS or n.startswith(LEGACY_PREFIXES)]
        manifest = Manifest.create(path, command, set(names))
    return manifest


def default_dir(kind: str, name: str | None) -> Path:
    return RUNS / kind / (Path(name).stem if name else "default")


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


def remove_temp_files(directory: Path, name: str = "*") -> list[Path]:
    """Temp files of saves killed mid-write (`.<name>.<random>.tmp`), removed; only the run that owns the
    directory (or the target file) calls this, so none of them is being written."""
    removed = [p for p in directory.glob(f".{name}.*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def refuse_to_replace(path: Path, force: bool, what: str = "file", inputs: tuple[Path, ...] = ()) -> None:
    """Single-file outputs (PCA files, exported encoders, panels, reports) are never replaced without --force, and
    never replace one of the command's own inputs or a run's checkpoint, even with it."""
    target = path.resolve()
    for given in inputs:
        if Path(given).resolve() == target:
            raise LdaeError(f"{path} is also an input of this command; writing the {what} there would destroy it; "
                            "pick another --out")
    if not path.exists():
        return
    if path.is_dir():
        raise LdaeError(f"{path} is a folder; give a file name for the {what}")
    manifest = Manifest.read(path.parent)
    if path.name == CHECKPOINT or (manifest is not None and path.name in manifest.files):
        raise LdaeError(f"{path} belongs to the run in {path.parent}; pick another --out (--force never replaces a "
                        "run's files)")
    if not force:
        raise LdaeError(f"{path} already exists; pick another --out, or add --force to replace the {what}")
