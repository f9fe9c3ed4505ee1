"""Pictures and small helpers: image grids and plots, atomic file writes, output checks, device choice, versions."""
from __future__ import annotations

import errno
import io
import math
import os
import platform
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake the user can fix (bad data, checkpoint, image or flag): reported as one line, exit status 2."""


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; once the body has written it, fsync it and os.replace it onto `path`.

    A crash or kill at any instant leaves either the old complete file or the new complete one. A write that fails
    (disk full, folder not writable) is a UserError that says the old file is untouched. The temporary file is named
    .{name}.{pid}.{random}.tmp, so that remove_stale_temporaries can tell one whose writer was killed.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole body has run
        raise UserError(folder_in_the_way(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain write would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(write_failure(path, err)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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


TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}\.tmp")  # .{name}.{pid}.{mkstemp's 8 random characters}.tmp


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files atomic_path left in `folder` when its process was killed mid-write (the pid in
    the name is no longer running); return them. Call it holding lock_folder, so no live writer shares the folder."""
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
    except (PermissionError, OverflowError):  # another user's process; or not a pid, so not ours to judge
        return True
    return True


@contextmanager
def lock_folder(folder: str | os.PathLike, what: str):
    """Hold an exclusive advisory lock on `folder` (through folder/.lock) while the body runs; a UserError naming
    the holder if another process has it. The kernel releases it when the holder exits, even by SIGKILL, so a
    crash cannot leave the folder locked. If the body fails, the lock file and the folders made for it are removed
    again (the folders only while empty). Does nothing where there is no fcntl (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # folders the lock creates, innermost first
    made_lock = not (folder / ".lock").exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+")  # never truncated by opening: the holder's pid stays readable
    except OSError as err:
        raise UserError(f"cannot create {folder / '.lock'} ({err.strerror or err}); choose another folder") from None
    busy = f"{folder} is in use by another {what}"
    advice = "wait for it to finish or pass another --checkpoint-dir"
    with f:  # closing the file releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{busy} (pid {f.read().strip() or 'unknown'}); {advice}") from None
        except OSError as err:
            raise UserError(f"cannot lock {folder / '.lock'} ({err.strerror or err}); choose a folder on a local disk") from None
        try:  # the file locked must still be the folder's .lock (a start that failed meanwhile may have removed it)
            current = os.fstat(f.fileno()).st_ino == os.stat(folder / ".lock").st_ino
        except FileNotFoundError:
            current = False
        if not current:
            raise UserError(f"{busy}; {advice}")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        except BaseException:  # the body failed: while still holding the lock, remove the lock file and folders made here
            if made_lock:
                (folder / ".lock").unlink(missing_ok=True)
            for p in made:
                if any(p.iterdir()):
                    break
                p.rmdir()
            raise


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (see atomic_path). Serialised in memory first, so that a failing disk raises an
    OSError from the write itself (torch's own file writer reports it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Stop before any long work if files cannot be written into folder `path` (creating nothing): the nearest
    existing part of the path must be a folder we can create a file in."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; pass a folder to write into")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({err.strerror or err}); pass a folder you can write to") from None


def pick_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu; a device that is asked for by name must exist."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device auto or cpu")
    if name == "mps" and not mps:
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(name)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device`: channels-last on the CPU (oneDNN's fast layout for these convolutions); TF32 tensor
    cores for convolutions and matrix products on CUDA (fp32 range, 10-bit mantissa products)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "python": platform.python_version()}


# ----------------------------------------------------------------------------- pictures
# Every picture is drawn with matplotlib (titles, row labels, legends) around torchvision's make_grid,
# and written atomically so an interrupted run never leaves a half-written PNG.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and os.replace, then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    finally:
        _plt().close(fig)
    return Path(path)


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2):
    """(N, 1, 28, 28) intensities -> an (H, W) numpy array laid out by torchvision's make_grid."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)[0].numpy()


def plot_rows(rows: list[torch.Tensor], labels: list[str], title: str, path: str | os.PathLike,
              column_labels: list[str] | None = None, scale: float = 0.75) -> Path:
    """Rows of digits, one labelled row each; all rows the same length."""
    plt = _plt()
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, n * scale), len(rows) * scale * 1.05 + 0.6), squeeze=False, dpi=100)
    for ax, row, label in zip(axes[:, 0], rows, labels):
        ax.imshow(grid_image(row, nrow=n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    if column_labels:
        ax = axes[-1, 0]
        ax.set_xticks([2 + 30 * i + 14 for i in range(n)], column_labels, fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike, title: str = "Test digits and their VAE reconstructions") -> Path:
    return plot_rows([originals, reconstructions], ["test digit", "reconstruction"], title=title, path=path)


def plot_grid(images: torch.Tensor, title: str, path: str | os.PathLike, nrow: int = 8) -> Path:
    plt = _plt()
    rows = math.ceil(images.shape[0] / nrow)
    fig, ax = plt.subplots(figsize=(nrow * 0.6 + 0.4, rows * 0.6 + 0.8), dpi=100)
    ax.imshow(grid_image(images, nrow=nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return save_figure(fig, path)


def plot_loss_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Train and validation loss, bce and kl per epoch, with the best epoch (lowest validation loss) marked."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, key, name in zip(axes, ("loss", "bce", "kl"), ("negative ELBO (bce + kl)", "reconstruction (bce)", "KL divergence")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train", markersize=3)
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation", markersize=3)
        ax.axvline(best, color="gray", linestyle=":", linewidth=1, label=f"best (epoch {best})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_latent_space(points: torch.Tensor, labels: torch.Tensor, path: str | os.PathLike) -> Path:
    """Posterior means placed on the latent map (evaluate.latent_map), one colour per digit."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    cmap = plt.get_cmap("tab10")
    points, labels = points.cpu().numpy(), labels.cpu().numpy()
    for d in range(10):
        sel = labels == d
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=3, alpha=0.6, color=cmap(d), label=str(d), rasterized=True)
    ax.set_xlabel("discriminant direction 1")
    ax.set_ylabel("discriminant direction 2")
    ax.set_title("Latent space: test-set posterior means on the two directions\nthat best separate the digits (linear discriminant analysis)")
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_anomalies(sections: list[tuple[str, torch.Tensor, torch.Tensor, list[str]]], path: str | os.PathLike, title: str = "") -> Path:
    """For each (title, digits, reconstructions, captions): a titled panel of digits above their reconstructions."""
    plt = _plt()
    n = sections[0][1].shape[0]
    fig = plt.figure(figsize=(n * 0.8, 2.3 * len(sections)), dpi=100, layout="constrained")
    for sub, (heading, digits, recons, captions) in zip(fig.subfigures(len(sections), 1), sections):
        axes = sub.subplots(2, n, squeeze=False)
        for i in range(n):
            for row, images in enumerate((digits, recons)):
                axes[row, i].imshow(images[i, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
                axes[row, i].set_xticks([])
                axes[row, i].set_yticks([])
            axes[0, i].set_title(captions[i], fontsize=7)
        axes[0, 0].set_ylabel("digit", fontsize=8)
        axes[1, 0].set_ylabel("recon.", fontsize=8)
        sub.suptitle(heading, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12)
    return save_figure(fig, path)


def plot_user_reconstruction(original: torch.Tensor, model_input: torch.Tensor, reconstruction: torch.Tensor, title: str, path: str | os.PathLike) -> Path:
    """The user's picture, the 28x28 input the model sees, and its reconstruction."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(7, 2.8), dpi=100)
    panels = ((original, "your image"), (model_input, "as the model sees it"), (reconstruction, "reconstruction"))
    for ax, (img, name) in zip(axes, panels):
        # the last two dimensions: squeeze() would make a picture 1 pixel high one-dimensional
        ax.imshow(img.detach().cpu().reshape(img.shape[-2:]).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
