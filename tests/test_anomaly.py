"""Anomaly scores: AUROC against its definition, each method built from its parts as documented, the
local pixel model's view, the reference a checkpoint carries, and the score command's CSV and its
reuse by reconstruct."""

from __future__ import annotations

import csv
import hashlib

import pytest
import torch
from helpers import (
    MNIST_DIR,
    copy_run,
    digit,
    needs_mnist,
    resave,
    run_main,
    tiny_images,
    tiny_model,
)

import anomaly
import checkpoint
import data


def test_auroc_against_hand_computed_values_and_its_pairwise_definition_and_needs_both_classes():
    hand = [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
        ([1, 2, 3], [1, 0, 0], 0.0),
        ([5, 5, 5, 5], [0, 1, 0, 1], 0.5),
    ]
    for scores, labels, expected in hand:
        assert anomaly.auroc(
            torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)
        ) == pytest.approx(expected)
    g = torch.Generator().manual_seed(0)
    scores, positive = (
        torch.randint(0, 20, (60,), generator=g).double(),
        torch.rand(60, generator=g) < 0.3,
    )
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert anomaly.auroc(scores, positive) == pytest.approx(pairs.mean().item())
    with pytest.raises(ValueError, match="positive and one negative"):
        anomaly.auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


@pytest.fixture(scope="module")
def small():
    """A tiny untrained model, its reference fitted on made-up 'training' and 'validation' images,
    and 6 images."""
    model, x = tiny_model(latent_dim=4), tiny_images(506, seed=1)
    return (
        model,
        anomaly.fit_reference(model, x[:300], x[300:500], samples=2, local_steps=10),
        x[500:],
    )


@pytest.mark.parametrize("method", anomaly.METHODS)
def test_every_method_gives_one_finite_reproducible_score_per_image(small, method):
    model, reference, x = small
    a = anomaly.score(model, x, method, samples=2, seed=1, reference=reference)
    assert a.shape == (6,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, anomaly.score(model, x, method, samples=2, seed=1, reference=reference))
    if method != "knn":  # the knn distance uses the posterior mean only: no z is drawn
        assert not torch.equal(
            a, anomaly.score(model, x, method, samples=2, seed=2, reference=reference)
        )


def test_default_method_needs_the_reference_and_bad_input_is_refused(small):
    model, reference, x = small
    default = anomaly.score(model, x, seed=3, reference=reference)
    assert torch.equal(default, anomaly.score(model, x, "combined", 10, 3, reference=reference))
    with pytest.raises(ValueError, match="needs the model's anomaly reference"):
        anomaly.score(model, x, "combined")
    assert anomaly.score(model, x, "elbo").shape == (6,)  # the plain ELBO needs none
    with pytest.raises(ValueError, match="unknown anomaly method"):
        anomaly.score(model, x, "magic", reference=reference)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        anomaly.score(model, x[:, 0], reference=reference)


def test_scores_are_built_from_their_parts_as_documented(small):
    """complexity = elbo - 1.5 * local nll; knn = mean distance to the 5 nearest reference codes;
    combined = the guarded z-sum, with the statistics of the validation images."""
    model, reference, x = small
    local = anomaly.LocalPixelModel()
    local.load_state_dict(reference["local_model"])
    elbo = anomaly.score(model, x, "elbo", samples=2, seed=5)
    with torch.no_grad():
        nll = local.nll(x)
        mu, _ = model.encode(x)
    complexity = anomaly.score(model, x, "complexity", samples=2, seed=5, reference=reference)
    assert torch.allclose(complexity, elbo - 1.5 * nll, atol=1e-3)
    distances = torch.cdist(mu, reference["codes"]).sort(1).values[:, :5].mean(1)
    assert torch.allclose(anomaly.score(model, x, "knn", reference=reference), distances, atol=1e-5)
    c = reference["calibration"]
    z = lambda v, name: (v - c[name][0]) / c[name][1]  # noqa: E731
    guarded = torch.maximum(
        (z(elbo - 1.5 * nll, "complexity") + z(distances, "knn") - c["sum"][0]) / c["sum"][1],
        z(elbo, "elbo"),
    )
    combined = anomaly.score(model, x, "combined", samples=2, seed=5, reference=reference)
    assert torch.allclose(combined, guarded, atol=1e-3)


def test_local_pixel_model_sees_only_pixels_above_and_to_the_left():
    """Changing a pixel may change the predictions of pixels after it in reading order, never its
    own or earlier."""
    local = anomaly.LocalPixelModel()
    x = torch.rand(1, 1, 28, 28)
    y = x.clone()
    y[0, 0, 10, 10] = 1 - y[0, 0, 10, 10]
    with torch.no_grad():
        changed = (local(x) - local(y)).abs()[0, 0] > 1e-7
    rows, cols = changed.nonzero().T
    assert changed.any() and not changed[10, 10]
    assert all(r > 10 or (r == 10 and c > 10) for r, c in zip(rows.tolist(), cols.tolist()))


def test_the_local_model_learns_stroke_texture():
    """Fitted to images of vertical bars, it finds bars cheaper than the same pixels scattered at
    random."""
    bars = torch.zeros(200, 1, 28, 28)
    for i in range(200):
        bars[i, 0, 4:24, 4 + i % 20] = 1.0
    fitted = anomaly.fit_local_model(bars, steps=80)  # the ratio is ~0.13 at 80 steps, ~0.6 at 50
    scattered = bars.flatten(1)[
        :, torch.randperm(784, generator=torch.Generator().manual_seed(0))
    ].view_as(bars)
    with torch.no_grad():
        assert fitted.nll(bars).mean() < 0.5 * fitted.nll(scattered).mean()


def test_a_malformed_reference_is_refused_where_it_enters(small):
    model, reference, _ = small
    ckpt = {"config": {"latent_dim": 4}, "anomaly_reference": reference}
    assert (
        anomaly.reference_of(ckpt) is reference
        and anomaly.reference_of({"config": {"latent_dim": 4}}) is None
    )
    codes, calibration = reference["codes"][:, :3], {"elbo": [0.0, 0.0]}
    for broken in (
        {"codes": codes},
        {"calibration": calibration},
        {"local_model": {}},
        {"test_scores": "many"},
    ):
        with pytest.raises(ValueError, match="anomaly reference is malformed"):
            anomaly.reference_of({**ckpt, "anomaly_reference": reference | broken})


@needs_mnist
def test_foreign_images_score_higher_and_the_stored_test_scores_give_percentiles(trained):
    model, ckpt = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    reference = anomaly.reference_of(ckpt)  # stored in best.pt at the end of training
    digits = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])
    s_digits = anomaly.score(model, digits[:200], samples=4, reference=reference)
    noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for foreign in (1 - digits[:20], noise):
        assert anomaly.score(
            model, foreign, samples=4, reference=reference
        ).median() > torch.quantile(s_digits, 0.95)
    stored = reference["test_scores"]
    assert len(stored) == 10000 and torch.equal(stored, stored.sort().values)
    # batch 100 draws the same noise as the whole set
    first = anomaly.score(model, digits[:100], reference=reference)
    assert set(first.tolist()) <= set(stored.tolist())
    assert anomaly.percentile(stored, stored[2499].item()) == pytest.approx(25.0, abs=0.5)
    assert anomaly.percentile(stored, stored.max().item()) == 100.0
    assert anomaly.percentile(stored, stored.min().item() - 1) == 0


def test_csv_is_plain_and_reused_only_for_the_same_checkpoint_method_samples_and_seed(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights one")
    source = anomaly.provenance(ckpt, "elbo", 10, 0)
    labels, scores = torch.tensor([3, 1, 4]), torch.tensor([90.5, 40.25, -0.5])
    anomaly.write_csv(tmp_path / "anomaly_scores.csv", source, labels, scores)
    # the first line is the header
    rows = list(csv.DictReader((tmp_path / "anomaly_scores.csv").open()))
    expected = [("0", "3", 90.5), ("1", "1", 40.25), ("2", "4", -0.5)]
    assert [(r["index"], r["label"], float(r["score"])) for r in rows] == expected
    assert rows[0]["checkpoint_sha256"] == hashlib.sha256(b"weights one").hexdigest()[:16]
    assert torch.equal(anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source, 3), scores)
    for other in (("complexity", 10, 0), ("elbo", 5, 0), ("elbo", 10, 1)):
        assert (
            anomaly.read_csv_scores(
                tmp_path / "anomaly_scores.csv", anomaly.provenance(ckpt, *other), 3
            )
            is None
        )
    # not the expected rows
    assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source, 4) is None
    ckpt.write_bytes(b"weights two")  # retrained at the same path
    assert (
        anomaly.read_csv_scores(
            tmp_path / "anomaly_scores.csv", anomaly.provenance(ckpt, "elbo", 10, 0), 3
        )
        is None
    )


@needs_mnist
def test_score_writes_csv_with_provenance_reconstruct_reuses_it_and_a_held_out_digit_gets_its_auroc(
    trained, tmp_path
):
    folder = copy_run(trained, tmp_path)
    common = [
        "--checkpoint",
        folder / "best.pt",
        "--data-dir",
        MNIST_DIR,
        "--image-dir",
        tmp_path / "img",
    ]
    code, out, err = run_main(["score", *common, "--samples", 2, "--method", "elbo"])
    assert code == 0, err
    source = anomaly.provenance(folder / "best.pt", "elbo", 2, 0)
    rows = list(csv.DictReader((folder / "anomaly_scores.csv").open()))
    assert len(rows) == 10000 and all({k: r[k] for k in source} == source for r in rows)
    assert "method elbo" in out and "percentiles" in out and "AUROC" not in out
    assert (tmp_path / "img" / "anomalies.png").stat().st_size > 10_000
    picture = digit(tmp_path / "mine.png")
    code, out, err = run_main(["reconstruct", picture, *common, "--samples", 2, "--method", "elbo"])
    assert (
        code == 0 and "scoring the 10,000 test digits" not in out and "mine.png: elbo score" in out
    ), err
    stored = anomaly.read_csv_scores(folder / "anomaly_scores.csv", source, 10000)
    value, percentile = (
        float(out.split("elbo score ")[1].split(",")[0]),
        float(out.split("percentile ")[1].split()[0]),
    )
    assert percentile == pytest.approx(100 * (stored <= value).double().mean().item(), abs=0.05)
    # not reused
    code, out, err = run_main(["reconstruct", picture, *common, "--samples", 2, "--method", "knn"])
    assert code == 0 and "scoring the 10,000 test digits" in out and "mine.png: knn score" in out
    # A checkpoint whose run left digit 3 out (its config says so) reports how well the scores tell
    # 3s apart.
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    resave(ckpt | {"config": ckpt["config"] | {"exclude_digit": 3}}, folder / "best.pt")
    code, out, err = run_main(["score", *common, "--samples", 1, "--method", "elbo"])
    assert code == 0, err
    line = next(line for line in out.splitlines() if "AUROC" in line)
    rows = list(csv.DictReader((folder / "anomaly_scores.csv").open()))
    labels, scores = (
        torch.tensor([int(r["label"]) for r in rows]),
        torch.tensor([float(r["score"]) for r in rows]),
    )
    auroc = anomaly.auroc(scores, labels == 3)
    assert "digit 3" in line and float(line.split("=")[-1]) == pytest.approx(auroc, abs=1e-3)
