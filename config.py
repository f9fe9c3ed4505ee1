"""Every setting of a run, each written once: TrainConfig (how a run trains) and VAEConfig (the
network: VAE's own arguments). A field holds a setting's default, its range or choices and its help
text; the flags and --help (main.py) read them, and so does a checkpoint's stored config
(checkpoint.py), which is rebuilt and checked with them before anything long starts. Last, what
"auto" means on this machine: the device, the training arithmetic and the float settings.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from model import ACTIVATIONS, NORMS, VAE

# 200 MB of fp32 weights, and as much again for each of the gradients and Adam's moments
MAX_PARAMETERS = 50_000_000
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes
# VAE() is the default network: a model setting's default is the one VAE's signature writes
VAE_DEFAULTS = {name: p.default for name, p in inspect.signature(VAE).parameters.items()}


def setting(default, low, high, help: str, none: str = "", metavar=None, absent=MISSING):
    """A number setting: default, range (low to high inclusive; whole numbers when the bounds are
    ints) and help. `none`: None is allowed too, and means this ("all", "none"). `absent`: the value
    a checkpoint written before the setting existed is read with (the one that reproduces its old
    behaviour; by default, the default)."""
    meta = {"range": (low, high), "help": help, "none": none, "metavar": metavar}
    return field(default=default, metadata=meta | absent_value(absent))


def choice(default: str, options: tuple[str, ...], help: str, absent=MISSING):
    return field(
        default=default, metadata={"choices": options, "help": help} | absent_value(absent)
    )


def switch(help: str, absent=MISSING):
    """An on/off setting, off by default."""
    return field(default=False, metadata={"help": help} | absent_value(absent))


def absent_value(absent) -> dict:
    return {} if absent is MISSING else {"absent": absent}


@dataclass
class TrainConfig:
    """How a run trains (plain Python values, stored in checkpoints; on --resume only epochs may
    change)."""

    epochs: int = setting(
        20, 1, 10_000, help="passes over the training set; with --resume, the new total"
    )
    batch_size: int = setting(64, 1, 4096, help="images per Adam step")
    lr: float = setting(1e-3, 1e-8, 10.0, help="Adam learning rate")
    seed: int = setting(
        1,
        0,
        MAX_SEED,
        help="seed of weights, validation split, shuffling and noise; on one machine and device, "
        "the same seed and number of threads (OMP_NUM_THREADS) give the same run",
    )
    val_size: int = setting(
        5000, 1, 59_999, help="training images held out for validation, which picks best.pt"
    )
    subset: int | None = setting(
        None,
        1,
        60_000,
        none="all",
        help="train on only the first N training images, for quick runs",
    )
    exclude_digit: int | None = setting(
        None,
        0,
        9,
        none="none",
        help="leave this digit out of training and validation, to test anomaly detection on it",
    )
    binarize: bool = switch(
        help="binarized MNIST as in the literature: training pixels redrawn as "
        "Bernoulli(intensity) at every use, evaluation on one fixed binarization of the test set"
    )
    kl_warmup: int = setting(
        0,
        0,
        10_000,
        help="epochs over which the KL term's weight ramps from 0 to 1 (0: none); reported losses "
        "are always the plain BCE + KL",
    )
    lr_schedule: str = choice(
        "constant",
        ("constant", "cosine"),
        help="learning rate over the run: constant, or cosine decay to 0",
    )
    precision: str = choice(
        "auto",
        ("auto", "fp32", "bf16"),
        help="arithmetic of the training step: bf16 autocast (weights, Adam and every reported "
        "loss stay fp32) or fp32 (TF32 matrix products on CUDA); auto picks bf16 only on CPUs "
        "with Intel AMX, where bf16 matrix units make it faster, and fp32 elsewhere",
    )
    ema: float = setting(
        0.999,
        0.0,
        0.999999,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (Polyak averaging), which smooths "
        "out Adam's step-to-step jitter: validation, best.pt and the evaluation use the average, "
        "Adam keeps training the weights; the decay ramps up as min(DECAY, (1+t)/(10+t)) over the "
        "first steps. 0 turns it off",
    )


@dataclass
class VAEConfig:
    """The network's settings, stored in checkpoints: VAE's arguments, so VAE(**asdict(config))
    builds it; each default is VAE's own."""

    latent_dim: int = setting(VAE_DEFAULTS["latent_dim"], 1, 1024, help="size of z")
    channels: tuple[int, int] = setting(
        VAE_DEFAULTS["channels"],
        1,
        1024,
        metavar=("C1", "C2"),
        help="widths of the two stride-2 conv layers; the decoder mirrors them",
    )
    hidden_dim: int = setting(
        VAE_DEFAULTS["hidden_dim"],
        0,
        16384,
        help="width of the fully connected layers between conv features and z, 0 for none",
    )
    fc_layers: int = setting(
        VAE_DEFAULTS["fc_layers"],
        1,
        16,
        help="number of those fully connected layers, in encoder and decoder each",
    )
    res_blocks: int = setting(
        VAE_DEFAULTS["res_blocks"],
        0,
        16,
        help="residual blocks (two 3x3 convs) at 7x7 in encoder and decoder",
    )
    out_conv: int = setting(
        VAE_DEFAULTS["out_conv"],
        0,
        1024,
        help="channels of an extra 3x3 convolution at 28x28 that makes the output logits, 0 for "
        "none",
    )
    activation: str = choice(VAE_DEFAULTS["activation"], tuple(ACTIVATIONS), help="nonlinearity")
    norm: str = choice(
        VAE_DEFAULTS["norm"], NORMS, help="normalisation after the hidden convolutions"
    )

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):  # as a checkpoint stores it
            self.channels = tuple(self.channels)

    def parameter_count(self) -> int:
        """How many weights this network has, counted without allocating them (on the meta
        device)."""
        with torch.device("meta"):
            return sum(p.numel() for p in VAE(**asdict(self)).parameters())


def with_absent(kind: type, stored: dict) -> dict:
    """`stored` (a checkpoint's config) with every field of `kind` it lacks added: the field's
    `absent` value, else its default. A file written before a setting existed reads as it ran."""
    added = {}
    for f in fields(kind):
        if f.name not in stored:
            added[f.name] = f.metadata.get("absent", f.default)
    return stored | added


def span_text(low, high) -> str:
    """`1 to 10,000` or `1e-08 to 10`: a range as --help and the errors write it."""
    return f"{low:,} to {high:,}" if type(low) is int else f"{low:g} to {high:g}"


def range_text(low, high) -> str:
    return f"a {'whole ' if type(low) is int else ''}number from {span_text(low, high)}"


def check(config) -> None:
    """ValueError naming the first setting of a TrainConfig or VAEConfig whose type or value is
    outside its range, or, for a VAEConfig, an architecture too large to train."""
    for f in fields(config):
        check_value(f, getattr(config, f.name))
    if isinstance(config, VAEConfig) and (count := config.parameter_count()) > MAX_PARAMETERS:
        raise ValueError(
            f"these settings make {count:,} weights, more than the {MAX_PARAMETERS:,} this "
            "program trains"
        )


def check_value(f, value) -> None:
    """ValueError unless `value` is one field `f` allows."""
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if isinstance(f.default, bool) and type(value) is not bool:
        raise ValueError(f"{f.name} must be True or False, got {value!r}")
    if "range" not in meta or (value is None and meta["none"]):
        return
    low, high = meta["range"]
    kinds = (int,) if type(low) is int else (int, float)
    items = value
    if not isinstance(f.default, tuple):
        items = (value,)
    elif not (isinstance(value, tuple) and len(value) == len(f.default)):  # channels: two widths
        raise ValueError(f"{f.name} must be {len(f.default)} numbers, got {value!r}")
    if not all(type(v) in kinds and low <= v <= high for v in items):  # a NaN fails low <= v
        raise ValueError(f"{f.name} must be {range_text(low, high)}, got {value!r}")


# ------------------------------------------------------------------------- "auto" on this machine


@contextlib.contextmanager
def float_settings():
    """While the body runs: denormal floats flushed to zero (x86 CPUs are ~100x slower on them; late
    epochs ran 1.5x slower) and TF32 products on CUDA; the process's own settings are restored."""
    flushing = (torch.full((1,), 1e-30) * 1e-10).item() == 0  # torch has no getter for it
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": cuda, then mps, then cpu. A device asked for by name must be here (ValueError)."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda: no CUDA GPU is available here")
    if name == "mps" and not mps:
        raise ValueError("mps: Apple's MPS backend is not available here")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """The training step's arithmetic, "fp32" or "bf16": "auto" is bf16 on CPUs with Intel AMX
    (native bf16 matrix units), else fp32 (on CUDA this model's step is bound by kernel launches,
    which autocast adds). bf16 where it cannot run is a ValueError."""
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"
    if name == "bf16" and device.type == "mps":
        raise ValueError("bf16 is supported on cpu and cuda, not mps")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16: this GPU has no bf16 support")
    return name


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles, as the kernel reports them in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:  # not Linux: no way to ask without private torch APIs, so assume none
        return False
