"""Anomaly scores: AUROC, the methods' parts, the local pixel model, the reference, the CSV."""

import csv
import hashlib
from unittest import mock

import helpers
import pytest
import torch
from helpers import MNIST_DIR, copy_run, resave, run_main, tiny_images, tiny_model

import anomaly
import checkpoint
import data


def test_auroc_against_hand_computed_values_and_its_pairwise_definition_and_needs_both_classes():
    hand = {0.75: ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 0.0: ([1, 2, 3], [1, 0, 0])}
    for expected, (s, y) in (hand | {0.5: ([5, 5, 5, 5], [0, 1, 0, 1])}).items():
        assert anomaly.auroc(torch.tensor(s).double(), torch.tensor(y)) == pytest.approx(expected)
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (60,), generator=g).double()
    positive = torch.rand(60, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert anomaly.auroc(scores, positive) == pytest.approx(pairs.mean().item())
    with pytest.raises(ValueError, match="positive and one negative"):
        anomaly.auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


@pytest.fixture(scope="module")
def small():
    """A tiny untrained model, its reference fitted on made-up images, and 6 other images."""
    model, x = tiny_model(latent_dim=4), tiny_images(506, seed=1)
    reference = anomaly.fit_reference(model, x[:300], x[300:500], samples=2, local_steps=10)
    return model, reference, x[500:]


def test_each_method_is_its_documented_parts_and_a_score_is_the_same_alone_and_in_a_batch(small):
    """complexity = elbo - LOCAL_WEIGHT * local nll; knn: distance to the codes; combined: below."""
    model, reference, x = small
    local = anomaly.LocalPixelModel()
    local.load_state_dict(reference["local_model"])
    elbo = anomaly.score(model, x, "elbo", samples=2, seed=5)  # the plain ELBO needs no reference
    complexity = anomaly.score(model, x, "complexity", samples=2, seed=5, reference=reference)
    with torch.no_grad():
        assert torch.allclose(complexity, elbo - anomaly.LOCAL_WEIGHT * local.nll(x), atol=1e-3)
        mu, _ = model.encode(x)
    knn = anomaly.score(model, x, "knn", reference=reference | {"codes": torch.ones(7, 4)})
    assert torch.allclose(knn, (mu - 1).norm(dim=1), atol=1e-5)  # all the codes at one point
    default = anomaly.score(model, x, seed=3, reference=reference)
    assert torch.equal(default, anomaly.score(model, x, "combined", 10, 3, reference=reference))
    alone = torch.cat([anomaly.score(model, x[i : i + 1], reference=reference) for i in range(6)])
    together = anomaly.score(model, x, reference=reference, batch_size=4)
    assert torch.allclose(alone, together, atol=1e-4)
    assert anomaly.score(model, x[:0], reference=reference).shape == (0,)
    calibration = {"elbo": [100.0, 10.0], "complexity": [5.0, 2.0], "knn": [1.0, 0.5]}
    calibration["sum"] = [0.0, 1.5]
    gen, named = torch.Generator().manual_seed(0), list(calibration.items())[:3]
    parts = {name: mean + std * torch.randn(50, generator=gen) for name, (mean, std) in named}
    combined = anomaly.combine(parts, calibration)
    assert (combined >= (parts["elbo"] - 100) / 10 - 1e-6).all()
    for name in ("elbo", "complexity", "knn"):  # a stranger part never makes a lower score
        worse = parts | {name: parts[name] + 3 * calibration[name][1]}
        assert (anomaly.combine(worse, calibration) >= combined).all()
    typical = {name: torch.tensor([mean]) for name, (mean, _) in named}
    assert anomaly.combine(typical, calibration).item() == 0.0  # the validation mean scores 0


def test_every_method_scores_each_image_reproducibly_and_bad_arguments_are_refused(small):
    model, reference, x = small
    for method in anomaly.METHODS:
        a, b, c = (anomaly.score(model, x, method, 2, s, reference=reference) for s in (1, 1, 2))
        assert a.shape == (6,) and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, b) and torch.equal(a, c) == (method == "knn"), method  # knn: no z
    with pytest.raises(ValueError, match="needs the model's anomaly reference"):
        anomaly.score(model, x, "combined")
    with pytest.raises(ValueError, match="unknown anomaly method"):
        anomaly.score(model, x, "magic", reference=reference)
    with pytest.raises(ValueError, match="samples must be"):
        anomaly.score(model, x, samples=0, reference=reference)
    with pytest.raises(ValueError, match="finite"):
        anomaly.percentile(torch.arange(10.0), float("nan"))
    ckpt = {"config": {"latent_dim": 4}, "anomaly_reference": reference}
    assert anomaly.reference_of(ckpt) is reference
    assert anomaly.reference_of({"config": {"latent_dim": 4}}) is None
    narrow, no_parts = {"codes": reference["codes"][:, :3]}, {"calibration": {"elbo": [0.0, 0.0]}}
    for broken in (narrow, no_parts, {"local_model": {}}, {"test_scores": "many"}):
        with pytest.raises(ValueError, match="anomaly reference is malformed"):
            anomaly.reference_of({**ckpt, "anomaly_reference": reference | broken})


def test_the_local_model_sees_only_earlier_pixels_and_learns_stroke_texture():
    """A pixel changes only later pixels' predictions; bars cost less than the pixels scattered."""
    local, x = anomaly.LocalPixelModel(), torch.rand(1, 1, 28, 28)
    y = torch.where(torch.arange(784).view(1, 1, 28, 28) == 10 * 28 + 10, 1 - x, x)  # [10, 10]
    with torch.no_grad():
        changed = (local(x) - local(y)).abs()[0, 0] > 1e-7
    assert changed.any() and not changed[10, 10]
    assert all(r > 10 or (r == 10 and c > 10) for r, c in changed.nonzero().tolist())
    bars = torch.zeros(200, 1, 28, 28)
    bars[torch.arange(200), 0, 4:24, 4 + torch.arange(200) % 20] = 1.0  # image i: column 4 + i % 20
    fitted = anomaly.fit_local_model(bars, steps=80)  # the ratio is ~0.13 at 80 steps, ~0.6 at 50
    scatter = torch.randperm(784, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scattered = fitted.nll(bars.flatten(1)[:, scatter].view_as(bars))
        assert fitted.nll(bars).mean() < 0.5 * scattered.mean()


def test_foreign_images_score_higher_and_the_stored_test_scores_give_percentiles(trained):
    model, ckpt = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    reference = anomaly.reference_of(ckpt)  # stored in best.pt at the end of training
    digits = data.to_float(data.load_mnist(MNIST_DIR)["test_images"])
    s_digits = anomaly.score(model, digits[:200], samples=4, reference=reference)
    noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for foreign in (1 - digits[:20], noise):
        s_foreign = anomaly.score(model, foreign, samples=4, reference=reference)
        assert s_foreign.median() > torch.quantile(s_digits, 0.95)
    # a run on 2,000 images stores a seeded share of the test digits' scores, sorted
    stored, n = reference["test_scores"], len(reference["test_scores"])
    assert anomaly.MIN_TEST_SCORES <= n < 10000 and torch.equal(stored, stored.sort().values)
    every = anomaly.score(model, digits, reference=reference)
    assert all(torch.isclose(every, s, atol=1e-4).any() for s in stored[::20])  # test digits' own
    assert anomaly.percentile(stored, stored[n // 4 - 1].item()) == pytest.approx(25.0, abs=0.5)
    assert [anomaly.percentile(stored, v) for v in (stored.min() - 1, stored.max())] == [0, 100]


def test_the_csv_is_reused_only_for_its_checkpoint_method_samples_and_seed(tmp_path, monkeypatch):
    ckpt, path = tmp_path / "best.pt", tmp_path / "anomaly_scores.csv"
    ckpt.write_bytes(b"weights one")
    source = anomaly.provenance(ckpt, "elbo", 10, 0)
    labels, scores = torch.tensor([3, 1, 4]), torch.tensor([90.5, 40.25, -0.5])
    anomaly.write_csv(path, source, labels, scores)
    rows = list(csv.DictReader(path.open()))  # the first line is the header
    expected = [("0", "3", 90.5), ("1", "1", 40.25), ("2", "4", -0.5)]
    assert [(r["index"], r["label"], float(r["score"])) for r in rows] == expected
    assert rows[0]["checkpoint_sha256"] == hashlib.sha256(b"weights one").hexdigest()[:16]
    monkeypatch.setattr(anomaly, "TEST_IMAGES", 4)  # not a row for each test digit
    assert anomaly.read_csv_scores(path, source) is None
    monkeypatch.setattr(anomaly, "TEST_IMAGES", 3)
    assert torch.equal(anomaly.read_csv_scores(path, source), scores)
    for other in (("complexity", 10, 0), ("elbo", 5, 0), ("elbo", 10, 1)):
        assert anomaly.read_csv_scores(path, anomaly.provenance(ckpt, *other)) is None
    ckpt.write_bytes(b"weights two")  # retrained at the same path
    assert anomaly.read_csv_scores(path, anomaly.provenance(ckpt, "elbo", 10, 0)) is None


def test_score_writes_a_csv_reconstruct_reuses_it_held_out_digit_auroc(trained, tmp_path):
    folder, elbo2 = copy_run(trained, tmp_path), ["--samples", 2, "--method", "elbo"]
    common = ["--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path]
    code, out, err = run_main(["score", *common, *elbo2])
    assert code == 0 and "method elbo" in out and "percentiles" in out and "AUROC" not in out, err
    source = anomaly.provenance(folder / "best.pt", "elbo", 2, 0)
    rows = list(csv.DictReader((folder / "anomaly_scores.csv").open()))
    assert len(rows) == 10000 and all({k: r[k] for k in source} == source for r in rows)
    assert (tmp_path / "anomalies.png").stat().st_size > 10_000
    picture = helpers.digit(tmp_path / "in" / "mine.png")
    code, out, err = run_main(["reconstruct", picture, *common, *elbo2])
    assert code == 0 and "scoring the 10,000" not in out and "mine.png: elbo score" in out, err
    stored = anomaly.read_csv_scores(folder / "anomaly_scores.csv", source)
    value = float(out.split("elbo score ")[1].split(",")[0])
    percentile = float(out.split("as high as ")[1].split("%")[0])
    assert percentile == pytest.approx(100 * (stored <= value).double().mean().item(), abs=0.1)
    code, out, err = run_main(["reconstruct", picture, *common, "--samples", 2, "--method", "knn"])
    assert code == 0 and "scoring the 10,000 test digits" in out and "mine.png: knn score" in out
    # a run that left digit 3 out (its config says so): how well the scores tell 3s apart
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    resave(ckpt | {"config": ckpt["config"] | {"exclude_digit": 3}}, folder / "best.pt")
    code, out, err = run_main(["score", *common, "--samples", 1, "--method", "elbo"])
    assert code == 0, err
    line = next(line for line in out.splitlines() if "AUROC" in line)
    rows = list(csv.DictReader((folder / "anomaly_scores.csv").open()))
    threes = torch.tensor([r["label"] == "3" for r in rows])
    auroc = anomaly.auroc(torch.tensor([float(r["score"]) for r in rows]), threes)
    assert "digit 3" in line and float(line.split("=")[-1]) == pytest.approx(auroc, abs=1e-3)


def test_a_small_run_fits_a_shorter_reference_and_scores_a_share_of_the_test_digits(monkeypatch):
    """Scaled down: a run on 100 of 400 images fits a quarter of the steps, scores a quarter."""
    fit = mock.Mock(wraps=anomaly.fit_local_model)  # called (images, steps, ...)
    scaled = dict(FULL_REFERENCE_RUN=400, LOCAL_STEPS=8, MIN_LOCAL_STEPS=2, MIN_TEST_SCORES=20)
    for name, value in (scaled | {"fit_local_model": fit}).items():
        monkeypatch.setattr(anomaly, name, value)
    model, x, test_x = tiny_model(), tiny_images(600), tiny_images(100, seed=1)
    small, full = (anomaly.reference_for_run(model, x[:n], x[400:600], test_x) for n in (100, 400))
    assert [c.args[1] for c in fit.call_args_list] == [2, 8] and len(small["test_scores"]) == 25
    assert torch.equal(full["test_scores"], anomaly.score(model, test_x, reference=full).sort()[0])
    all_of_them = anomaly.score(model, test_x, reference=small).tolist()
    assert set(small["test_scores"].tolist()) < set(all_of_them)  # a part of the test digits
