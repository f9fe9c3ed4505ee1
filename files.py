"""Files, safely: atomic writes, the checkpoint folder's lock, stale temporaries, the user-error
type, paths the OS would refuse (check_path), output names that never overwrite an input, and
writing a file that describes another only while that one is unchanged (describing).

The ground floor of the project: it imports nothing of it, and everything may import it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad data, checkpoint, image, folder or flag): one line on stderr,
    exit status 2."""


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; once the body has written it, fsync it and os.replace
    it onto `path`.

    A crash or kill at any instant leaves either the old complete file or the new complete one. A
    write that fails (disk full, folder not writable) is a UserError that says the old file is
    untouched. The temporary file is named .{name}.{pid}.{random}.tmp, so that
    remove_stale_temporaries can tell one whose writer was killed.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole body has run
        raise UserError(folder_in_the_way(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes 0600; give the file the permissions a plain write would
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(write_failure(path, err)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_bytes_atomic(payload: bytes | memoryview, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def folder_in_the_way(path: Path) -> str:
    return f"{path} is a folder, not a file; move it away or choose another folder"


def write_failure(path: Path, err: OSError) -> str:
    """The one line that says why `path` could not be written, and what to do about it."""
    if err.errno == errno.EISDIR:  # os.replace onto a folder
        return folder_in_the_way(path)
    kept = f"the previous {path.name} is untouched" if path.exists() else "nothing was written"
    reason = f"cannot write {path} ({err.strerror or err}); {kept}"
    if err.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{reason}. Free some disk space or choose another folder"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}. {path.parent} is not writable: choose another folder"
    return f"{reason}. Choose another folder"


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Stop before any long work if files cannot be written into folder `path` (creating nothing):
    the OS must accept the path (check_path), and its nearest existing part must be a folder we can
    create a file in."""
    check_path(path, flag)
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{flag} {path}: {existing} is a file, not a folder; pass a folder to write into"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(
            f"{flag} {path}: cannot write in {existing} ({err.strerror or err}); "
            "pass a folder you can write to"
        ) from None


# ----------------------------------------------------------------------------- paths the OS refuses

NAME_MAX = 255  # bytes in one name: ext4, XFS, Btrfs, APFS and tmpfs all stop there


def check_path(
    path: str | os.PathLike, flag: str | None = None, fix: str = "pass another path"
) -> None:
    """One UserError line, naming `path` (after `flag`, if given), the reason and `fix`, if the OS
    would refuse it: a name longer than NAME_MAX bytes, a part that is a file where a folder must
    be, a symbolic link that loops or leads nowhere, a folder the user may not enter. A path that
    does not exist yet, but could be made, passes."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    long_names = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if long_names:
        size = len(os.fsencode(long_names[0]))
        raise UserError(
            f"{where}: a name in it is {size} bytes long ({long_names[0][:24]}...), more than the "
            f"{NAME_MAX} a file system allows; {fix}"
        )
    try:
        os.stat(path)
    except FileNotFoundError:
        # the nearest part on disk: a link to nothing is named, never written through
        nearest = path
        while not os.path.lexists(nearest) and nearest != nearest.parent:
            nearest = nearest.parent
        if nearest.is_symlink():
            target = os.readlink(nearest)
            raise UserError(
                f"{where}: {nearest} is a symbolic link to {target}, which does not exist; {fix}"
            ) from None
    except OSError as err:
        raise UserError(f"{where}: {refusal(path, err)}; {fix}") from None


def refusal(path: Path, err: OSError) -> str:
    """Why the OS refused `path` (err from os.stat or open), in words a user reads."""
    path = Path(path)
    if err.errno == errno.ENOTDIR:
        part = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path)
        return f"{part} is a file, not a folder"
    if err.errno == errno.ELOOP:
        return "a symbolic link in it loops (too many levels of symbolic links)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: you may not enter {entry_refused(path)}"
    if err.errno == errno.ENAMETOOLONG:
        return f"the path is {len(os.fsencode(path)):,} bytes long, more than the system allows"
    return str(err.strerror or err)


def entry_refused(path: Path) -> Path:
    """The folder on the way to `path` whose permissions shut the user out."""
    for part in reversed(path.parents):
        try:
            os.stat(part)
        except PermissionError:
            return part.parent
        except OSError:
            break
    return path.parent


def identity(path: str | os.PathLike) -> tuple | None:
    """What tells one version of a file from the next (None: no file): every atomic write
    (os.replace) gives the file a new inode."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def output_names(names: list[str], image_dir: Path) -> list[Path]:
    """reconstructed_<name>.png for each input: letters, digits, '.', '-' and '_' only (a name of
    any bytes gives a safe one), distinct even for inputs of the same name in different folders (a
    counter is added), short enough for any file system (long names are cut, with a hash to keep
    them apart), and never one of the inputs themselves (a counter is added, with a note)."""
    outs, taken = [], {"image"}  # reconstructed_image.png is evaluate's picture of test digits
    inputs = {file_id(name) for name in names} - {None}
    for name in names:
        raw = os.fsencode(Path(name).stem)
        stem = re.sub(r"[^\w.-]", "_", raw.decode(errors="replace")).lstrip(".") or "picture"
        if len(stem.encode()) > 100:
            stem = (
                stem.encode()[:80].decode(errors="ignore")
                + "-"
                + hashlib.sha256(raw).hexdigest()[:8]
            )
        unique, n = stem, 1
        while True:
            out = image_dir / f"reconstructed_{unique}.png"
            given = file_id(out) in inputs
            if given:
                print(f"note: {out} is one of the pictures given, so it is not written over")
            # case-insensitive: names that differ in case are one file on macOS
            if unique.lower() not in taken and not given:
                break
            n += 1
            unique = f"{stem}_{n}"
        taken.add(unique.lower())
        outs.append(image_dir / f"reconstructed_{unique}.png")
    return outs


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """Which file `path` is (device and inode), however it is spelled or linked; None if none."""
    version = identity(path)
    return version[:2] if version else None


@contextmanager
def describing(source: str | os.PathLike, seen: tuple | None, written: str | os.PathLike):
    """Around writing `written`, a file that describes `source` (metrics.json, anomaly_scores.csv
    beside a checkpoint): `source` must still be the version `seen` (identity) was taken of, before
    the write and after it, else a UserError, and what was written is removed again. So a reader
    never leaves a description of an old checkpoint beside a new one that a run saved meanwhile."""
    message = (
        f"{source} was replaced while it was read (a training run saved a new one there); "
        f"{Path(written).name} was not written, so that it describes no other checkpoint than the "
        "one beside it. Run the command again once the run has finished"
    )
    if identity(source) != seen:
        raise UserError(message)
    yield
    mine = identity(written)
    if identity(source) != seen:
        if identity(written) == mine:
            Path(written).unlink(missing_ok=True)
        raise UserError(message)


# -------------------------------------------------------------- temporaries left by a killed writer

# .{name}.{pid}.{mkstemp's 8 random characters}.tmp
TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files atomic_path left in `folder` when its process was killed mid-write
    (the pid in the name is no longer running); return them. Call it holding lock_folder, so no live
    writer shares the folder."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there, not probe it
        return []
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        match = TEMPORARY_NAME.fullmatch(p.name)
        if match and p.is_file() and not process_running(int(match.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    # another user's process; or not a pid, so not ours to judge
    except (PermissionError, OverflowError):
        return True
    return True


# ---------------------------------------------------------------------- one training run per folder


@contextmanager
def lock_folder(folder: str | os.PathLike, what: str = "training run", flag: str | None = None):
    """Hold an exclusive lock on `folder` (flock on folder/.lock) while the body runs; a UserError
    naming the holder if another process has it. The kernel releases the lock when its holder exits,
    even by SIGKILL, so a crash cannot leave the folder locked; a run that ends removes the file
    too. The lock file is opened without following links and must be a plain file of its own, so a
    prepared folder cannot make it write elsewhere. Folders made for it are removed again if the
    body fails. A command line names the folder's `flag` in the advice. Does nothing where there
    is no fcntl (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    # folders the lock creates, innermost first
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    with open_lock_file(folder / ".lock") as f:  # closing the file releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(busy_message(folder, what, f.read(20).strip(), flag)) from None
        except OSError as err:
            raise UserError(
                f"cannot lock {folder / '.lock'} ({err.strerror or err}); "
                "choose a folder on a local disk"
            ) from None
        # a run that ended meanwhile removed the file we opened
        if not still_linked(f, folder / ".lock"):
            raise UserError(busy_message(folder, what, "", flag))
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        except BaseException:
            remove_made(made, [folder / ".lock"])
            raise
        # still holding the lock, so no other run is inside
        (folder / ".lock").unlink(missing_ok=True)


def open_lock_file(path: Path):
    """folder/.lock opened for reading and writing (created if absent, never truncated by opening),
    refusing a symbolic link, a hard link to another name, or anything that is not a plain file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; remove it (nothing was written through it)"
            ) from None
        raise UserError(
            f"cannot create {path} ({err.strerror or err}); choose another folder"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a plain file"
        raise UserError(f"{path} is {kind}; remove it (nothing was written to it)")
    return os.fdopen(fd, "r+")


def still_linked(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return False


def busy_message(folder: Path, what: str, pid: str, flag: str | None) -> str:
    holder = f" (pid {pid})" if pid else ""
    elsewhere = f"pass another {flag}" if flag else "choose another folder"
    return f"{folder} is in use by another {what}{holder}; wait for it to finish or {elsewhere}"


def remove_made(folders: list[Path], made_files: list[Path]) -> None:
    """Undo what a failed step made: `made_files`, then `folders` (innermost first) while they are
    empty."""
    for path in made_files:
        path.unlink(missing_ok=True)
    for folder in folders:
        if not folder.exists():
            continue
        if any(folder.iterdir()):
            break
        folder.rmdir()
