"""The settings of a training run (TrainConfig), and the check of any settings against their ranges.

Each setting's range is written once, in its field (model.setting): the flags (main.py) are parsed
with it, and a checkpoint's stored config is rebuilt and checked with it (checkpoint.py), before
anything long starts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from model import VAEConfig, choice, setting

# 200 MB of fp32 weights, and as much again for each of the gradients and Adam's moments
MAX_PARAMETERS = 50_000_000


@dataclass
class TrainConfig:
    """How a run trains (plain Python values, stored in checkpoints; on --resume only epochs may
    change)."""

    epochs: int = setting(20, 1, 10_000)
    batch_size: int = setting(64, 1, 4096)
    lr: float = setting(1e-3, 1e-8, 10.0)
    # seeds the weights, the split, the batch order and the noise
    seed: int = setting(1, 0, 2**63 - 1)
    val_size: int = setting(5000, 1, 59_999)  # training images held out to pick best.pt
    subset: int | None = setting(None, 1, 60_000, optional=True)  # train on only the first N images
    # leave a digit out, to test anomaly scores
    exclude_digit: int | None = setting(None, 0, 9, optional=True)
    binarize: bool = False  # train on pixels redrawn as Bernoulli(intensity) at every use
    # epochs over which the KL term's weight ramps from 0 to 1
    kl_warmup: int = setting(0, 0, 10_000)
    lr_schedule: str = choice("constant", ("constant", "cosine"))
    # auto: resolved by the command line; else fp32
    precision: str = choice("auto", ("auto", "fp32", "bf16"))
    # decay of the weight average that is validated and saved; 0: none
    ema: float = setting(0.999, 0.0, 0.999999)


def span_text(low, high) -> str:
    """`1 to 10,000` or `1e-08 to 10`: a range as --help and the errors write it."""
    return f"{low:,} to {high:,}" if type(low) is int else f"{low:g} to {high:g}"


def range_text(low, high) -> str:
    return f"a {'whole ' if type(low) is int else ''}number from {span_text(low, high)}"


def check(config) -> None:
    """ValueError naming the first setting of a TrainConfig or VAEConfig whose type or value is
    outside its range, or, for a VAEConfig, an architecture too large to train."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if isinstance(f.default, bool) and type(value) is not bool:
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
        if "range" not in meta or (value is None and meta["optional"]):
            continue
        low, high = meta["range"]
        kinds = (int,) if type(low) is int else (int, float)
        # channels: each of the two widths
        items = value if isinstance(f.default, tuple) else (value,)
        if isinstance(f.default, tuple) and not (
            isinstance(value, tuple) and len(value) == len(f.default)
        ):
            raise ValueError(f"{f.name} must be {len(f.default)} numbers, got {value!r}")
        if not all(type(v) in kinds and low <= v <= high for v in items):  # a NaN fails low <= v
            raise ValueError(f"{f.name} must be {range_text(low, high)}, got {value!r}")
    if isinstance(config, VAEConfig) and (count := config.parameter_count()) > MAX_PARAMETERS:
        raise ValueError(
            f"these settings make {count:,} weights, more than the {MAX_PARAMETERS:,} this program trains"
        )
