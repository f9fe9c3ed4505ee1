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


def test_complexity_and_knn_are_their_documented_parts(small):
    """complexity = elbo - LOCAL_WEIGHT * local nll; knn = mean distance to the KNN_K nearest
    reference codes (here: all the codes lie at one point, so it is the distance to that point)."""
    model, reference, x = small
    local = anomaly.LocalPixelModel()
    local.load_state_dict(reference["local_model"])
    elbo = anomaly.score(model, x, "elbo", samples=2, seed=5)
    complexity = anomaly.score(model, x, "complexity", samples=2, seed=5, reference=reference)
    with torch.no_grad():
        assert torch.allclose(complexity, elbo - anomaly.LOCAL_WEIGHT * local.nll(x), atol=1e-3)
        mu, _ = model.encode(x)
    point = {"codes": torch.ones(7, 4)}
    knn = anomaly.score(model, x, "knn", reference=reference | point)
    assert torch.allclose(knn, (mu - 1).norm(dim=1), atol=1e-5)


def test_combined_ranks_as_its_parts_rank_and_never_falls_below_the_elbo_guard():
    calibration = {"elbo": [100.0, 10.0], "complexity": [5.0, 2.0], "knn": [1.0, 0.5]}
    calibration["sum"] = [0.0, 1.5]
    gen = torch.Generator().manual_seed(0)
    parts = {
        name: mean + std * torch.randn(50, generator=gen)
        for name, (mean, std) in list(calibration.items())[:3]
    }
    combined = anomaly.combine(parts, calibration)
    assert (combined >= (parts["elbo"] - 100) / 10 - 1e-6).all()
    for name in ("elbo", "complexity", "knn"):  # a stranger part never makes a lower score
        worse = parts | {name: parts[name] + 3 * calibration[name][1]}
        assert (anomaly.combine(worse, calibration) >= combined).all()
    typical = {name: torch.tensor([mean]) for name, (mean, _) in list(calibration.items())[:3]}
    assert anomaly.combine(typical, calibration).item() == 0.0  # the validation mean scores 0


def test_a_score_depends_on_its_image_alone_and_the_door_refuses_what_is_not_one(small):
    model, reference, x = small
    alone = torch.cat([anomaly.score(model, x[i : i + 1], reference=reference) for i in range(6)])
    together = anomaly.score(model, x, reference=reference, batch_size=4)
    assert torch.allclose(alone, together, atol=1e-4)
    assert anomaly.score(model, x[:0], reference=reference).shape == (0,)
    for images, words in ((x * float("nan"), "NaN"), (x * 255, "255"), (x.double(), "float64")):
        with pytest.raises(ValueError, match=words):
            anomaly.score(model, images, reference=reference)
    with pytest.raises(ValueError, match="samples must be"):
        anomaly.score(model, x, samples=0, reference=reference)
    with pytest.raises(ValueError, match="finite"):
        anomaly.percentile(torch.arange(10.0), float("nan"))


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
    # a run on 2,000 images stores a seeded share of the test digits' scores, sorted
    stored, n = reference["test_scores"], len(reference["test_scores"])
    assert anomaly.MIN_TEST_SCORES <= n < 10000 and torch.equal(stored, stored.sort().values)
    every = anomaly.score(model, digits, reference=reference)
    assert all(torch.isclose(every, s, atol=1e-4).any() for s in stored[::20])  # test digits' own
    assert anomaly.percentile(stored, stored[n // 4 - 1].item()) == pytest.approx(25.0, abs=0.5)
    assert anomaly.percentile(stored, stored.max().item()) == 100.0
    assert anomaly.percentile(stored, stored.min().item() - 1) == 0


def test_csv_is_plain_and_reused_only_for_the_same_checkpoint_method_samples_and_seed(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(anomaly, "TEST_IMAGES", 3)
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
    assert torch.equal(anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source), scores)
    for other in (("complexity", 10, 0), ("elbo", 5, 0), ("elbo", 10, 1)):
        changed = anomaly.provenance(ckpt, *other)
        assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", changed) is None
    monkeypatch.setattr(anomaly, "TEST_IMAGES", 4)  # not a row for each test digit
    assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source) is None
    monkeypatch.setattr(anomaly, "TEST_IMAGES", 3)
    ckpt.write_bytes(b"weights two")  # retrained at the same path
    source = anomaly.provenance(ckpt, "elbo", 10, 0)
    assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source) is None


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
    model, _ = checkpoint.load_model(folder / "best.pt")
    first = data.to_float(data.load_mnist(MNIST_DIR)["test_images"][:1])
    alone = anomaly.score(model, first, "elbo", samples=2).item()
    assert float(rows[0]["score"]) == pytest.approx(alone, abs=1e-4)  # as scored among 10,000
    assert "method elbo" in out and "percentiles" in out and "AUROC" not in out
    assert (tmp_path / "img" / "anomalies.png").stat().st_size > 10_000
    picture = digit(tmp_path / "mine.png")
    code, out, err = run_main(["reconstruct", picture, *common, "--samples", 2, "--method", "elbo"])
    assert code == 0 and "scoring the 10,000" not in out and "mine.png: elbo score" in out, err
    stored = anomaly.read_csv_scores(folder / "anomaly_scores.csv", source)
    value = float(out.split("elbo score ")[1].split(",")[0])
    percentile = float(out.split("as high as ")[1].split("%")[0])
    assert percentile == pytest.approx(100 * (stored <= value).double().mean().item(), abs=0.1)
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


def test_a_small_run_fits_a_shorter_reference_and_scores_a_seeded_share_of_the_test_digits(
    monkeypatch,
):
    """Scaled down (a full run here: 400 training images): a run on 100 fits the local model for a
    quarter of the steps and scores a quarter of the test digits; a full run scores them all."""
    for name, value in dict(FULL_REFERENCE_RUN=400, LOCAL_STEPS=8, MIN_LOCAL_STEPS=2).items():
        monkeypatch.setattr(anomaly, name, value)
    monkeypatch.setattr(anomaly, "MIN_TEST_SCORES", 20)
    steps, fit = [], anomaly.fit_local_model

    def counted(images, n, **kw):
        steps.append(n)
        return fit(images, n, **kw)

    monkeypatch.setattr(anomaly, "fit_local_model", counted)
    model, x = tiny_model(), tiny_images(700)
    test_x = x[600:]
    small, full = (anomaly.reference_for_run(model, x[:n], x[400:600], test_x) for n in (100, 400))
    assert steps == [2, 8] and len(small["test_scores"]) == 25
    assert torch.equal(full["test_scores"], anomaly.score(model, test_x, reference=full).sort()[0])
    all_of_them = anomaly.score(model, test_x, reference=small).tolist()
    assert set(small["test_scores"].tolist()) < set(all_of_them)  # a part of the test digits
