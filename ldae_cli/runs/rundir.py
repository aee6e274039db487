"""Folders ldae writes into belong to the user unless ldae can prove it wrote them.

- Proof of ownership: when ldae starts a run (or an export folder, or a prepared dataset) in a folder it
  writes a marker, `.ldae-run.json`, with a run id and the manifest of every file and folder it writes
  there, each recorded before it is written. `--force` removes what the manifest lists and nothing else;
  a folder holding anything else is refused, naming those files. A folder the manifest lists (`tensorboard`)
  is emptied of the files ldae writes there (FOLDER_FILES), never removed whole: a user's file inside it makes
  `--force` refuse, naming it, so nothing of theirs is lost. `.`, the home directory and a filesystem root are
  never replaced. Ownership is judged on the folder a path resolves to (a `runs -> /scratch` link stays
  usable); inside it, symlinks are removed as links and never followed. A damaged marker is named as such:
  ldae cannot tell its files from the user's, so it neither replaces nor resumes that folder.
- ldae never writes through a link it did not make: its files are created by an atomic rename onto the path
  (`write_atomically`) or opened with O_NOFOLLOW (`open_own`); a link, FIFO, device or socket where ldae keeps
  a file of a run it resumes is an error naming it before anything is written (`check_own`).
- Run folders written before the marker existed still resume (the marker is added then), and `--force`
  replaces one only when every file in it is one ldae writes and its checkpoint reads as ldae's.
- A live run holds `.ldae.lock` (pid, host, command) under an exclusive flock: of several processes that
  want a folder at once exactly one gets it, and a lock whose process died is released by the kernel. A lock
  naming a live process that is not an ldae run, or a pid no process can have, is refused with what it names.
- Temp files a killed save left behind are removed when the run next starts.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import stat
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
LEGACY_OUTPUTS = {
    "config.yaml",
    CONFIG,
    CHECKPOINT,
    METRICS,
    "pca.safetensors",
    "loss.png",
    "accuracy.png",
    "report.png",
    "results.json",
    "eval.json",
    "best.safetensors",
    "coco_eval.txt",
    "load_report.json",
    "reconstructions.png",
    "report.json",
    "tensorboard",
    "wandb",
}
LEGACY_PREFIXES = ("eval-only-", "coco_eval-only-")
FOLDERS = ("tensorboard", "wandb")  # the entries of a run that are folders
# what ldae writes inside a folder it lists: TensorBoard's event files, W&B's, a prepared split's shards and indexes
FOLDER_FILES = (
    "events.out.tfevents.*",
    "run-*",
    "offline-run-*",
    "latest-run",
    "debug*.log",
    "images-[0-9]*.npy",
    "labels-[0-9]*.npy",
    "files-[0-9]*.txt",
    "skipped-[0-9]*.txt",
    "labels.npy",
    "files.txt",
    TEMP_GLOB,
)
PID_MAX = 2**22  # Linux's largest possible pid (PID_MAX_LIMIT); other systems stay below it


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def process_command(pid: int) -> str | None:
    """The command line of process `pid`, None where it cannot be read (no /proc, another user's, a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or None


def might_be_ldae(command: str | None) -> bool:
    """Whether a process with this command line can be an ldae run: ldae runs in Python (its console script,
    torchrun, a submitit job, a script calling ldae.api); unknown (None) counts as yes."""
    return command is None or "ldae" in command or Path(command.split()[0]).name.startswith("python")


def entry_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "a file"


def check_own(path: Path, folder: bool = False) -> None:
    """Where ldae keeps one of its files (a folder, with `folder`) there is nothing yet or exactly that, never a
    link, FIFO, device or socket it would read or write through; anything else is an error naming it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        raise LdaeError(
            f"{path} is {entry_kind(mode)}, not the {'folder' if folder else 'file'} ldae keeps there; "
            "ldae writes only its own files there, never through a link, FIFO or device; move it away or "
            "pick another --out"
        )


def open_own(path: Path, flags: int, follow: bool = False) -> int:
    """A descriptor of the regular file `path` (created with O_CREAT in `flags`): never opened through a link
    (`follow` allows one, for reading), never a FIFO, which would block, nor a device."""
    if not follow:
        check_own(path)
    elif path.exists() and not path.is_file():
        check_own(path.resolve())
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):  # replaced since it was checked
            check_own(path)
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced since it was checked
        os.close(fd)
        raise LdaeError(f"{path} is {entry_kind(mode)} where ldae keeps its own file; move it away")
    return fd


def read_own(path: Path, follow: bool = False) -> bytes | None:
    """The bytes of file `path` (None when there is none), read as `open_own` opens it."""
    try:
        fd = open_own(path, os.O_RDONLY, follow)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a kill leaves the old file or the new one. The rename
    replaces the path itself, so nothing is ever written through a link; one found there is refused."""
    check_own(path)
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
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": f"ldae {self.command}",
            "since": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        for _ in range(10):
            fd = open_own(self.path, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = self._read(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    self._refuse(holder or {})
                raise
            if not self._same_file(fd):  # its holder released (unlinked) it between our open and our flock
                os.close(fd)
                continue
            try:
                self._check_taken(self._read(fd) or {})
            except LdaeError:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise LdaeError(f"{self.path.parent}: could not take its lock {self.path}; other runs keep taking it")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.lstat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            return None  # torn by a start killed while writing it: nobody holds it (we have the flock)
        return holder if isinstance(holder, dict) else None

    def _check_taken(self, holder: dict) -> None:
        """Refuse a lock we could flock whose holder may still be alive: an ldae from before locks were flocked,
        or a process of another host (which cannot be checked from here); a dead holder's lock is ours. A pid no
        process can have, or a live process that cannot be an ldae run, is said as it is."""
        try:
            pid, host = int(holder["pid"]), str(holder["host"])
        except (KeyError, TypeError, ValueError):
            return
        if host != socket.gethostname():
            self._refuse(holder)
        fix = f"delete {self.path} if no ldae run uses {self.path.parent}"
        if not 0 < pid <= PID_MAX:
            raise LdaeError(f"{self.path} names pid {pid}, which no process can have (the file was edited); {fix}")
        if pid == os.getpid() or not pid_alive(pid):
            return
        command = process_command(pid)
        if command is not None and not might_be_ldae(command):
            raise LdaeError(
                f"{self.path} names pid {pid}, which is a live process but not an ldae run "
                f"({command.split()[0]}) and holds no lock; {fix}"
            )
        self._refuse(holder)

    def _refuse(self, holder: dict) -> None:
        host = str(holder.get("host", "?"))
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise LdaeError(
            f"{self.path.parent} is in use by `{holder.get('command', 'ldae')}` (pid {holder.get('pid', '?')} "
            f"on {where}, since {holder.get('since', '?')}); wait for it to finish or pick another --out. If "
            f"that process is gone (its machine crashed), delete {self.path}"
        )

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
        """The folder's marker; None when it has none. A damaged one is an error: without it ldae cannot tell its
        files there from the user's."""
        path = directory / MARKER
        try:
            raw = read_own(path)
            if raw is None:
                return None
            data, why = json.loads(raw), "not ldae's marker format"
        except LdaeError:
            data, why = None, f"{entry_kind(os.lstat(path).st_mode)}, not a file"
        except ValueError:
            data, why = None, "not valid JSON, e.g. truncated"
        except OSError as exc:
            data, why = None, f"unreadable: {exc.strerror}"
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("run_id"), str)
            or not isinstance(data.get("files"), list)
            or not all(isinstance(n, str) for n in data["files"])
        ):
            raise LdaeError(
                f"{path}, the marker of what ldae wrote in {directory}, is damaged ({why}), so ldae cannot "
                f"tell its files there from yours; delete it if {directory} holds only a run of ldae's "
                "(it then counts as a run from before the marker), else move the folder away or pick "
                "another --out"
            )
        return cls(directory, data)

    @classmethod
    def create(cls, directory: Path, command: str, files: frozenset[str] | set[str] = frozenset()) -> "Manifest":
        manifest = cls(
            directory,
            {
                "format": 1,
                "run_id": uuid.uuid4().hex,
                "command": f"ldae {command}",
                "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "files": [],
            },
        )
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


def foreign_inside(folder: Path) -> list[str]:
    """What a folder ldae lists holds that ldae does not write there (nothing, for a link or a file)."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in FOLDER_FILES))


def remove_entry(path: Path) -> None:
    """Delete one file, or what ldae writes in a folder and then the folder if that empties it (a user's file
    there is kept, and the folder with it); a symlink is removed as a link, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    theirs = set(foreign_inside(path))
    for p in path.iterdir():
        if p.name in theirs:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)  # W&B's run folder: all its own
        else:
            p.unlink()
    if not theirs:
        path.rmdir()


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
    from ldae_cli.runs.checkpoint import read_metadata

    if CHECKPOINT not in names or not all(n in LEGACY_OUTPUTS or n.startswith(LEGACY_PREFIXES) for n in names):
        return False
    try:
        read_metadata(path / CHECKPOINT)
    except LdaeError:
        return False
    return True


def listing(names: list[str] | set[str], limit: int = 5) -> str:
    return ", ".join(sorted(names)[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def finished_at(ckpt: Path) -> str | None:
    """'step N of N' when `ckpt`'s metadata says its run finished, final evaluation included (else None)."""
    from ldae_cli.runs.checkpoint import read_metadata

    try:
        extra = read_metadata(ckpt)["extra"]
    except LdaeError:
        return None
    step, total = extra.get("step"), extra.get("total_steps")
    last = extra.get("eval", {"step": total})  # a run stopped before its final evaluation: --resume finishes it
    done = (
        extra.get("finished")
        and isinstance(step, int)
        and isinstance(total, int)
        and isinstance(last, dict)
        and last.get("step") == total
    )
    return f"step {step:,} of {total:,}" if done else None


def decide(
    path: Path,
    command: str,
    force: bool,
    keep: frozenset[str] | set[str] = frozenset(),
    restartable=None,
    replaces: tuple[str, ...] | None = None,
    kind: str = "run's",
) -> tuple[str, list[str]]:
    """What a new start in the existing folder `path` does, without touching it: ("empty" | "restart" | "replace",
    our entries it removes); refusals are raised. See `claim`."""
    names = [n for n in entries(path) if n not in keep]
    manifest = Manifest.read(path)
    if not names:
        return "empty", []
    if manifest is not None:
        ours = [n for n in names if n in manifest.files]
    else:
        ours = names if legacy_run(path, names) and command in TRAINING_COMMANDS else []
    foreign = [n for n in names if n not in ours] + [f"{n}/{e}" for n in ours for e in foreign_inside(path / n)]
    if manifest is not None:
        written_by = str(manifest.data.get("command", "")).removeprefix("ldae ")
        if not foreign and restartable is not None and restartable(path):
            return "restart", ours
        if force and written_by not in (replaces or TRAINING_COMMANDS):
            raise LdaeError(
                f"{path} holds what `ldae {written_by}` wrote; `ldae {command} --force` does not replace "
                "it; pick another --out"
            )
    if not force:
        if CHECKPOINT in names:
            if done := finished_at(path / CHECKPOINT):
                raise LdaeError(
                    f"{path} already holds a {kind} checkpoint of a finished run ({done}): its outputs "
                    f"are {listing(ours or names, 8)}; pick another --out for a new run, or add --force "
                    "to replace it"
                )
            raise LdaeError(
                f"{path} already holds a {kind} checkpoint; continue it with `ldae {command} --resume {path}`"
                f" (or add --continue), pick another --out, or add --force to replace that run"
            )
        raise LdaeError(
            f"{path} already holds {listing(names)}; pick another --out"
            + (", or add --force to replace what ldae wrote there" if not foreign else "")
        )
    why = protected(path)
    if why:
        raise LdaeError(f"--force never empties {path}: {why}; pick another --out")
    if foreign:
        raise LdaeError(
            f"--force replaces only what ldae wrote, and {path} also holds {listing(foreign)}, which ldae "
            "did not write; move them away or pick another --out"
        )
    return "replace", ours


def claim(
    path: Path,
    command: str,
    force: bool,
    keep: frozenset[str] | set[str] = frozenset(),
    restartable=None,
    replaces: tuple[str, ...] | None = None,
    kind: str = "run's",
) -> Manifest:
    """Make `path` (locked by us, existing) ready for a new run or output folder and return its manifest.

    An empty folder (but for `keep`, e.g. the user's config file that --config named) is marked as ours. A
    folder of ours (marker) whose `restartable(path)` says it holds the same run, killed before its first
    checkpoint, is cleared of our files and started again. Anything else needs --force, which removes only
    our files and refuses when the folder holds any other. `replaces`: the commands whose folders --force may
    replace (default: the training stages'), so that an export never replaces a run, nor a run a dataset."""
    action, ours = decide(path, command, force, keep, restartable, replaces, kind)
    if action == "restart":
        manifest = Manifest.read(path)
        assert manifest is not None  # decide restarts only a folder with our marker
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
    """The manifest of a run being resumed, whose entries are checked before anything is written (`check_own`); a
    run written before the marker existed gets one now, listing the files ldae writes that it holds."""
    manifest = Manifest.read(path)
    names = (
        manifest.files
        if manifest is not None
        else {n for n in entries(path) if n in LEGACY_OUTPUTS or n.startswith(LEGACY_PREFIXES)}
    )
    for name in sorted(names):
        check_own(path / name, folder=name in FOLDERS)
    return manifest or Manifest.create(path, command, names)


def data_name(data) -> str:
    """What default names carry of a dataset (a SourceConfig): data.path's folder or archive, else the kind a config
    names (fashion-mnist), so outputs of one recipe on two datasets never meet."""
    name = Path(os.path.abspath(os.path.expanduser(data.path))).name if data.path else data.source
    return re.sub(r"\.(tar\.gz|tgz|tar)$", "", name) or name


def run_name(config: str | None, data) -> str | None:
    """<config>-<data folder>, a run's default name (a config that names only a kind, cifar10, names its data)."""
    return f"{config_stem(config)}-{data_name(data)}" if config and data.path else config


def config_stem(name: str) -> str:
    return re.sub(r"\.ya?ml$", "", Path(name).name)  # trajectory/T3.5 -> T3.5, never T3


def default_dir(kind: str, name: str | None) -> Path:
    return RUNS / kind / (config_stem(name) if name else "default")


def resolve(command: str, kind: str, out: str | None, name: str | None, resume_path: Path | None) -> Path:
    """Where the run writes: the resumed checkpoint's directory (--out may only repeat it), else --out
    (run.out_dir) or runs/<kind>/<name>."""
    if resume_path is not None:
        home = resume_path.parent
        if out and Path(out).resolve() != home.resolve():
            raise LdaeError(
                f"--resume continues the run in {home}, and a resumed run writes only there; --out {out} "
                "names another directory (leave out --out)"
            )
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
