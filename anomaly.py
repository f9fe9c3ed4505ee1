"""Anomaly scores: how unlike the training digits an image is (higher = stranger), the reference
they compare against, and the test digits' scores that turn a score into a percentile. The methods:

    elbo        the negative ELBO in nats: what the model fails to explain. Flags badly written
                digits, but ranks simple images (a 1, a blank page) as typical whatever the model
                learned.
    complexity  the negative ELBO minus LOCAL_WEIGHT times the nats a local pixel model needs (a
                likelihood ratio against a model of stroke texture): what remains is what the VAE
                finds unlike a digit.
    knn         mean distance of the image's code to its KNN_K nearest codes of training images.
    combined    complexity and knn on one scale, guarded by elbo (see combine): the default, best
                on held-out digits.

All but elbo need the reference the model was trained with (fit_reference), which its checkpoint
holds. In a notebook: `anomaly.score(model, images, reference=anomaly.reference_of(ckpt))` with
float images (B, 1, 28, 28) in [0, 1] returns (B,) scores;
`anomaly.percentile(reference["test_scores"], score)` ranks one among the test digits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import float_settings
from files import write_text_atomic
from mnist_files import TEST_IMAGES
from model import VAE, check_images, kl_per_dim, neg_elbo_terms, reparameterize

METHODS = ("combined", "complexity", "knn", "elbo")
DEFAULT_METHOD = "combined"
# a in complexity = elbo - a * local_nll, chosen on validation images (docs/anomaly.md)
LOCAL_WEIGHT = 1.5
KNN_K = 5  # neighbours averaged in the latent kNN distance
SCORE_SAMPLES = 10  # z draws averaged per image
SCORE_SEED = 0  # seed of those draws
ENCODE_CHUNK = 1000  # images encoded at once where many are
REFERENCE_IMAGES = 10_000  # training images whose codes the kNN distance compares against
UNITS = {
    "combined": "standard deviations above the validation digits' mean",
    "complexity": "nats",
    "knn": "latent distance",
    "elbo": "nats",
}
# validation images whose score statistics put the parts of `combined` on one scale
CALIBRATION_IMAGES = 1_000
# A run on at least this many training images (a default run has 55,000) gets the full reference:
# LOCAL_STEPS steps of the local pixel model and all the test digits scored. A smaller run gets a
# share in proportion, never below the MIN_ ones, so that a quick run's reference is quick too.
FULL_REFERENCE_RUN = 40_000
LOCAL_STEPS, MIN_LOCAL_STEPS = 600, 100
MIN_TEST_SCORES = 1_000


# ----------------------------------------------------------------------------- the parts of a score


def score_noise(samples: int, latent_dim: int, seed: int, device="cpu") -> torch.Tensor:
    """The z noise every image is scored with: `samples` standard normal draws, (samples,
    latent_dim), the same for every image, so that a score is a function of the image alone, never
    of the other images in its batch. Drawn on the CPU, so every device scores with the same
    draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, latent_dim, generator=gen).to(device)


@torch.inference_mode()
def neg_elbo_per_image(model: VAE, x, mu, logvar, noise: torch.Tensor) -> torch.Tensor:
    """Each image's negative ELBO in nats, given its posterior (mu, logvar): the reconstruction
    term averaged over the z draws mu + sigma * noise[s], the KL exact."""
    bce = torch.zeros(len(x), device=x.device)
    for eps in noise:
        z = reparameterize(mu, logvar, eps=eps.expand_as(mu))
        bce += neg_elbo_terms(model.decode(z), x=x, mu=mu, logvar=logvar)[0]
    kl = kl_per_dim(mu, logvar).sum(1)
    return bce / len(noise) + kl


class LocalPixelModel(nn.Module):
    """A deliberately short-sighted model of digit images: each pixel predicted from the 12 pixels
    above and to its left (a masked 5x5 convolution, then two 1x1 layers), the same at every
    position. It learns stroke texture (how ink continues locally) but cannot know what digit, or
    whether any digit, the strokes make. Its negative log-likelihood, in the same Bernoulli nats as
    the VAE's, measures how complex an image is at that local level."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 5, 5)
        mask[..., :2, :] = 1  # the two rows above
        mask[..., 2, :2] = 1  # the two pixels to the left
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(1, hidden, 5, padding=2)
        self.head = nn.Sequential(
            nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.conv2d(x, self.conv.weight * self.mask, self.conv.bias, padding=2))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image negative log-likelihood in nats."""
        return F.binary_cross_entropy_with_logits(self(x), x, reduction="none").flatten(1).sum(1)


def fit_local_model(
    images: torch.Tensor, steps: int = 600, seed: int = 0, progress: bool = False
) -> LocalPixelModel:
    """Fit the local pixel model to in-distribution float images by Adam, 64 images a step (600
    steps take about half a minute on a 2-core CPU). Seeded, without touching the caller's random
    state, and with gradients on even when called under torch.no_grad()."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        local = LocalPixelModel().to(images.device)
        opt = torch.optim.Adam(local.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        desc = "anomaly reference: fitting the local pixel model"
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            x = images[torch.randint(len(images), (64,), generator=gen).to(images.device)].clone()
            loss = local.nll(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return local.eval()


@torch.inference_mode()
def score_parts(
    model: VAE, x: torch.Tensor, reference: dict | None, noise: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The raw scores of a batch: elbo (nats), and with a reference, complexity (nats) and knn
    (latent distance). `noise` is score_noise's draws."""
    mu, logvar = model.encode(x, check_values=False)  # checked once, at the door of score
    parts = {"elbo": neg_elbo_per_image(model, x, mu, logvar, noise)}
    if reference is not None:
        local = LocalPixelModel().to(x.device)
        local.load_state_dict(reference["local_model"])
        parts["complexity"] = parts["elbo"] - reference["local_weight"] * local.nll(x)
        codes = reference["codes"].to(x.device)
        # each distance computed on its own (not through a matrix product, whose rounding depends
        # on the batch), so that an image's score does not depend on the images beside it
        distances = torch.cdist(mu, codes, compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distances.topk(min(KNN_K, len(codes)), dim=1, largest=False)
        parts["knn"] = nearest.values.mean(1)
    return parts


def z_sum(parts: dict[str, torch.Tensor], calibration: dict[str, list[float]]) -> torch.Tensor:
    """z(complexity) + z(knn), each standardised by the validation images' mean and std."""
    total = 0
    for name in ("complexity", "knn"):
        mean, std = calibration[name]
        total = total + (parts[name] - mean) / std
    return total


def combine(parts: dict[str, torch.Tensor], calibration: dict[str, list[float]]) -> torch.Tensor:
    """combined = max(z(z(complexity) + z(knn)), z(elbo)), z standardising by the validation images'
    mean and std. The sum flags an unseen digit by either sign; the max with z(elbo) keeps far-off
    images (noise, say), whose ELBO is enormous, from being excused by an equally unlikely local
    texture."""
    sum_mean, sum_std = calibration["sum"]
    elbo_mean, elbo_std = calibration["elbo"]
    local_and_knn = (z_sum(parts, calibration) - sum_mean) / sum_std
    return torch.maximum(local_and_knn, (parts["elbo"] - elbo_mean) / elbo_std)


@torch.inference_mode()
def posterior(model: VAE, x: torch.Tensor, chunk: int = ENCODE_CHUNK):
    """(mu, logvar) of many images, encoded `chunk` at a time to bound the memory."""
    stats = [model.encode(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return torch.cat([mu for mu, _ in stats]), torch.cat([logvar for _, logvar in stats])


def posterior_means(model: VAE, x: torch.Tensor) -> torch.Tensor:
    return posterior(model, x)[0]


# ---------------------------------------------------------- the reference a model is scored against


@float_settings()
def fit_reference(
    model: VAE,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    samples: int = SCORE_SAMPLES,
    seed: int = SCORE_SEED,
    local_steps: int | None = None,
    progress: bool = False,
) -> dict:
    """What the complexity, knn and combined scores compare an image against, from the model's own
    training images (float, any number) and validation images: the local pixel model (600 Adam
    steps, fewer for a run on fewer than 40,000 images: see scaled), the codes of up to 10,000
    training images, and the mean and std of each score over up to 1,000 validation images. Plain
    tensors and floats: it is stored in best.pt at the end of training."""
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[
        :REFERENCE_IMAGES
    ]
    reference_x = train_x[pick.to(train_x.device)]
    codes = posterior_means(model, reference_x)
    local_steps = local_steps or max(MIN_LOCAL_STEPS, scaled(LOCAL_STEPS, len(train_x)))
    local = fit_local_model(reference_x, local_steps, seed=seed, progress=progress)
    reference = {
        "local_weight": LOCAL_WEIGHT,
        "codes": codes.cpu(),
        "local_model": {k: v.cpu() for k, v in local.state_dict().items()},
    }
    noise = score_noise(samples, codes.shape[1], seed, device=val_x.device)
    parts = score_parts(model, val_x[:CALIBRATION_IMAGES], reference, noise)
    calibration = {name: [v.mean().item(), v.std().item()] for name, v in parts.items()}
    local_and_knn = z_sum(parts, calibration)
    calibration["sum"] = [local_and_knn.mean().item(), local_and_knn.std().item()]
    reference["calibration"] = calibration
    return reference


@float_settings()  # as training and evaluation run
def score(
    model: VAE,
    images: torch.Tensor,
    method: str | None = None,
    samples: int = SCORE_SAMPLES,
    seed: int = SCORE_SEED,
    batch_size: int = 100,
    reference: dict | None = None,
    progress: str = "",
) -> torch.Tensor:
    """Anomaly scores (B,) of float images (B, 1, 28, 28) in [0, 1] by `method` (the module's
    docstring), higher = more anomalous, on the images' device. Every image is scored with the same
    `samples` z draws from `seed`, so its score does not depend on the other images given with it.
    `progress`, when given, describes a progress bar over the batches."""
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown anomaly method {method!r}; choose one of {', '.join(METHODS)}")
    if type(samples) is not int or samples < 1:
        raise ValueError(f"samples must be a whole number of at least 1, got {samples!r}")
    if method != "elbo" and reference is None:
        raise ValueError(
            f"method {method!r} needs the model's anomaly reference, which its checkpoint does not "
            "hold: pass reference=anomaly.fit_reference(model, training_images, "
            "validation_images), or method='elbo'"
        )
    check_images(images)
    noise = score_noise(samples, model.latent_dim, seed, device=images.device)
    used = reference if method != "elbo" else None
    out = [torch.empty(0, device=images.device)]
    for i in tqdm(range(0, len(images), batch_size), desc=progress, disable=not progress):
        parts = score_parts(model, images[i : i + batch_size], reference=used, noise=noise)
        if method == "combined":
            out.append(combine(parts, reference["calibration"]))
        else:
            out.append(parts[method])
    return torch.cat(out)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of telling positives (higher score expected) from negatives: the
    Mann-Whitney U statistic with average ranks for ties, so a tie counts one half."""
    scores, positive = (
        torch.as_tensor(scores, dtype=torch.float64).flatten(),
        torch.as_tensor(positive, dtype=torch.bool).flatten(),
    )
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct value's first occurrence
    first_rank = torch.cumsum(counts, 0) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def percentile(test_scores: torch.Tensor, value: float) -> float:
    """The percentage of test digits that score at most `value` (test_scores: the test digits'
    scores, any order)."""
    if not math.isfinite(value):
        raise ValueError(f"a score must be a finite number, got {value!r}")
    return 100.0 * (test_scores <= value).double().mean().item()


# ----------------------------------------------------------- the test set's scores, with provenance


def provenance(checkpoint_path: str | Path, method: str, samples: int, seed: int) -> dict[str, str]:
    """What produced a set of scores, as columns of anomaly_scores.csv. The checkpoint is named by
    its content's hash, so a retrained file at the same path does not match."""
    digest = hashlib.sha256(Path(checkpoint_path).read_bytes()).hexdigest()[:16]
    return {
        "method": method,
        "samples": str(samples),
        "seed": str(seed),
        "checkpoint_sha256": digest,
    }


def write_csv(
    path: Path, source: dict[str, str], labels: torch.Tensor, scores: torch.Tensor
) -> None:
    """One row per test digit: index, label, score, and what produced the score (the same on every
    row), so that any CSV reader (csv.DictReader, pandas.read_csv) takes the first line as the
    header."""
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=["index", "label", "score", *source], lineterminator="\n"
    )
    writer.writeheader()
    for i, (label, s) in enumerate(zip(labels.tolist(), scores.tolist())):
        writer.writerow({"index": i, "label": int(label), "score": f"{s:.4f}"} | source)
    write_text_atomic(out.getvalue(), path)


def read_csv_scores(path: Path, source: dict[str, str]) -> torch.Tensor | None:
    """The scores in `path` if a row for each test digit is there and all came from exactly this
    checkpoint, method, samples and seed, else None."""
    if not path.is_file():
        return None
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        foreign = any({k: row.get(k) for k in source} != source for row in rows)
        if len(rows) != TEST_IMAGES or foreign:
            return None
        return torch.tensor([float(row["score"]) for row in rows])
    # edited, damaged or unreadable (a UnicodeDecodeError is a ValueError): compute afresh
    except (ValueError, TypeError, KeyError, csv.Error, OSError):
        return None


# --------------------------------------------------------------- the reference a checkpoint carries


def reference_for_run(
    model: VAE, train_x: torch.Tensor, val_x: torch.Tensor, test_x: torch.Tensor, progress=False
):
    """What training stores in best.pt: the reference fitted on the run's own training and
    validation images, and the sorted scores of the test digits, so that a percentile needs no data
    set. A run on fewer than 40,000 training images scores a seeded share of the test digits in
    proportion (at least 1,000), as it fits a shorter local model (see scaled)."""
    reference = fit_reference(model, train_x, val_x, progress=progress)
    n = max(MIN_TEST_SCORES, scaled(len(test_x), len(train_x)))
    if n < len(test_x):
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(SCORE_SEED))[:n]
        test_x = test_x[pick.sort().values.to(test_x.device)]
    bar = f"anomaly reference: scoring the {len(test_x):,} test digits" if progress else ""
    reference["test_scores"] = (
        score(model, test_x, reference=reference, progress=bar).sort().values.cpu()
    )
    return reference


def test_scores(
    path: str | Path,
    model: VAE,
    reference: dict | None,
    test_images,
    method: str | None = None,
    samples: int = SCORE_SAMPLES,
    seed: int = SCORE_SEED,
    progress: str = "",
) -> torch.Tensor:
    """The test digits' scores that rank an image's score, for the checkpoint at `path`: those
    training stored in it (default method, samples and seed), else anomaly_scores.csv beside it when
    `python main.py score` wrote it with exactly these settings, else scored now. `test_images` is a
    function returning the float test images, called only in that last case."""
    method = method or DEFAULT_METHOD
    stored = (reference or {}).get("test_scores")
    as_stored = (method, samples, seed) == (DEFAULT_METHOD, SCORE_SAMPLES, SCORE_SEED)
    if as_stored and stored is not None:
        return stored
    source = provenance(path, method=method, samples=samples, seed=seed)
    cached = read_csv_scores(Path(path).parent / "anomaly_scores.csv", source)
    if cached is not None:
        return cached
    x = test_images()
    return score(model, x, method, samples, seed, reference=reference, progress=progress).cpu()


def scaled(full: int, train_images: int) -> int:
    """`full` (a full run's count) in proportion to a run's training images, rounded up: all of it
    from FULL_REFERENCE_RUN images on."""
    return min(full, math.ceil(full * train_images / FULL_REFERENCE_RUN))


def reference_of(ckpt: dict) -> dict | None:
    """The anomaly reference a checkpoint carries, checked where it enters (ValueError if it is
    malformed), or None."""
    ref = ckpt.get("anomaly_reference")
    if ref is not None and not is_reference(ref, ckpt["config"]["latent_dim"]):
        raise ValueError("its anomaly reference is malformed")
    return ref


def is_reference(ref, latent_dim: int) -> bool:
    """The shape of fit_reference's dict, plus the test scores training adds."""
    with torch.device("meta"):
        local_shapes = {name: t.shape for name, t in LocalPixelModel().state_dict().items()}
    local = ref.get("local_model") if isinstance(ref, dict) else None
    if (
        not isinstance(local, dict)
        or {n: getattr(t, "shape", None) for n, t in local.items()} != local_shapes
    ):
        return False
    codes, calibration, scores = ref.get("codes"), ref.get("calibration"), ref.get("test_scores")
    if not (
        isinstance(codes, torch.Tensor)
        and codes.dim() == 2
        and codes.shape[1] == latent_dim
        and len(codes)
    ):
        return False
    if not (
        isinstance(calibration, dict) and {"elbo", "complexity", "knn", "sum"} <= set(calibration)
    ):
        return False
    if type(ref.get("local_weight")) not in (int, float):
        return False
    if not all(is_mean_and_std(v) for v in calibration.values()):
        return False
    return scores is None or (
        isinstance(scores, torch.Tensor) and scores.dim() == 1 and len(scores) > 0
    )


def is_mean_and_std(v) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and all(type(s) in (int, float) and math.isfinite(s) for s in v)
        and v[1] > 0
    )


# ------------------------------------------------------------------------- one wording of a score

VERDICTS = ("typical", "unusual", "very unusual")
# from these percentiles of the test digits' scores on, a score is unusual and very unusual
VERDICT_PERCENTILES = (90, 99)


def verdict(percentile: float) -> str:
    """typical, unusual or very unusual: where a score's percentile (anomaly.percentile) lies."""
    return VERDICTS[sum(percentile >= p for p in VERDICT_PERCENTILES)]


def describe(score: float, percentile: float | None) -> str:
    """A score as every command and the demo word it: 'score 0.25, at least as high as 45.5% of test
    digits: typical' (percentile None: 'score 0.25'). "At least as high as", since percentile counts
    the test digits scoring at most the score; the percentile is cut, not rounded, to one decimal,
    so that 89.96 reads 89.9 (still true, and never 90.0 beside "typical"); + 0.0 turns a -0.00
    into 0.00."""
    text = f"score {round(score, 2) + 0.0:.2f}"
    if percentile is None:
        return text
    shown = math.floor(percentile * 10 + 1e-9) / 10  # 1e-9: 57.3 * 10 may be 572.999...
    return f"{text}, at least as high as {shown:.1f}% of test digits: {verdict(percentile)}"
