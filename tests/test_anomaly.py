"""Anomaly scores (every method), AUROC, the scores' CSV and its provenance, and the user's own digit images."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import anomaly
import checkpoint
import data
from helpers import MNIST_DIR, copy_run, needs_mnist, run_main, train_args
from model import VAE


def centre_of_mass(img: torch.Tensor) -> tuple[float, float]:
    img = img.squeeze()
    idx = torch.arange(28, dtype=torch.float32)
    return ((img.sum(1) * idx).sum() / img.sum()).item(), ((img.sum(0) * idx).sum() / img.sum()).item()


def draw_digit(size, mode, background, ink, box):
    img = Image.new(mode, size, background)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    d.ellipse(box, outline=ink, width=max(2, (x1 - x0) // 6))  # a zero
    d.line([(x1, y0), (x1 + (x1 - x0) // 3, y1)], fill=ink, width=max(2, (x1 - x0) // 6))  # with a tail off-centre
    return img


CASES = {
    "white_rgba": ((300, 180), "RGBA", (255, 255, 255, 255), (10, 10, 10, 255), (40, 30, 120, 160)),
    "transparent_rgba": ((90, 90), "RGBA", (0, 0, 0, 0), (30, 30, 200, 255), (50, 10, 75, 60)),
    "black_gray": ((37, 53), "L", 0, 230, (3, 20, 20, 50)),
    "gray_on_light_rgb": ((64, 41), "RGB", (200, 210, 205), (40, 40, 40), (30, 5, 45, 35)),
}


@pytest.mark.parametrize("case", CASES)
def test_preprocessing_gives_centred_light_on_dark_28x28(tmp_path, case):
    path = tmp_path / f"{case}.png"
    draw_digit(*CASES[case]).save(path)
    original, x = data.load_digit_image(path)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    cy, cx = centre_of_mass(x)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1
    corners = torch.cat([x[0, :3, :3].flatten(), x[0, -3:, -3:].flatten(), x[0, :3, -3:].flatten(), x[0, -3:, :3].flatten()])
    assert corners.max() < 0.05  # background dark, ink light, as in MNIST
    ink = x[0] > 0.05
    rows, cols = ink.any(1).nonzero(), ink.any(0).nonzero()
    assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) in (19, 20, 21)  # longer side scaled to 20 px
    assert original.shape == (CASES[case][0][1], CASES[case][0][0])


def test_polarity_dark_on_light_equals_light_on_dark(tmp_path):
    dark_on_light = draw_digit((60, 60), "L", 255, 0, (15, 10, 40, 50))
    light_on_dark = Image.eval(dark_on_light, lambda v: 255 - v)
    dark_on_light.save(tmp_path / "a.png")
    light_on_dark.save(tmp_path / "b.jpg", quality=95)
    _, a = data.load_digit_image(tmp_path / "a.png")
    _, b = data.load_digit_image(tmp_path / "b.jpg")
    assert (a - b).abs().mean() < 0.02


def test_blank_and_unreadable_images_raise_one_line_errors(tmp_path):
    Image.new("RGB", (40, 40), (120, 120, 120)).save(tmp_path / "flat.png")
    (tmp_path / "notes.txt").write_text("hello")
    good = draw_digit((50, 50), "L", 255, 0, (10, 10, 35, 45))
    good.save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    for name, words in (("flat.png", "all one colour"), ("notes.txt", "not an image"), ("cut.png", "unreadable"), ("missing.png", "no such file")):
        with pytest.raises(data.ImageError) as err:
            data.load_digit_image(tmp_path / name)
        assert name in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("scores,labels,expected", [
    ([1, 2, 3, 4], [0, 0, 1, 1], 1.0),
    ([4, 3, 2, 1], [0, 0, 1, 1], 0.0),
    ([1, 1, 1, 1], [0, 1, 0, 1], 0.5),  # all tied: chance
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # sklearn's documented example
    ([1, 2, 2, 3], [0, 0, 1, 1], 0.875),  # one tied pair counts 1/2: (1 + 1 + 0.5 + 1) / 4
    ([5, 5, 1, 9, 5], [1, 0, 0, 1, 0], 5 / 6),  # pairs (pos, neg): (5,5)=.5 (5,1)=1 (5,5)=.5 (9,*)=1,1,1 -> 5/6
])
def test_auroc_hand_computed(scores, labels, expected):
    assert anomaly.auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)) == pytest.approx(expected)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        anomaly.auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_auroc_matches_the_pairwise_definition_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores, positive = torch.randint(0, 20, (60,), generator=g).double(), torch.rand(60, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert anomaly.auroc(scores, positive) == pytest.approx(pairs.mean().item())


def small_model() -> VAE:
    torch.manual_seed(0)
    return VAE(latent_dim=4, channels=(4, 8), hidden_dim=16).eval()


@pytest.fixture(scope="module")
def small():
    """A tiny untrained model, its reference fitted on random 'training' and 'validation' images, and test images."""
    model, g = small_model(), torch.Generator().manual_seed(1)
    train_x, val_x = torch.rand(300, 1, 28, 28, generator=g), torch.rand(200, 1, 28, 28, generator=g)
    return model, anomaly.fit_reference(model, train_x, val_x, samples=2, local_steps=50), torch.rand(6, 1, 28, 28, generator=g), train_x


@pytest.mark.parametrize("method", anomaly.METHODS)
def test_every_method_gives_one_finite_reproducible_score_per_image(small, method):
    model, reference, x, _ = small
    a = anomaly.score(model, x, method, samples=2, seed=1, reference=reference)
    assert a.shape == (6,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, anomaly.score(model, x, method, samples=2, seed=1, reference=reference))
    if method != "knn":  # the knn distance uses the posterior mean only: no z is drawn
        assert not torch.equal(a, anomaly.score(model, x, method, samples=2, seed=2, reference=reference))


def test_default_method_reference_and_bad_input(small):
    model, reference, x, _ = small
    assert anomaly.DEFAULT_METHOD in anomaly.METHODS
    assert torch.equal(anomaly.score(model, x, seed=3, reference=reference),
                       anomaly.score(model, x, anomaly.DEFAULT_METHOD, seed=3, reference=reference))
    with pytest.raises(ValueError, match="needs the model's anomaly reference"):
        anomaly.score(model, x, "combined")
    assert anomaly.score(model, x, "elbo").shape == (6,)  # the plain ELBO needs none
    with pytest.raises(ValueError, match="unknown anomaly method"):
        anomaly.score(model, x, "magic", reference=reference)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        anomaly.score(model, x[:, 0], reference=reference)


def test_scores_are_built_from_their_parts_as_documented(small):
    """complexity = elbo - 1.5 * local nll; knn = mean distance to the 5 nearest reference codes; combined = the guarded
    z-sum, with the statistics of the validation images."""
    model, reference, x, train_x = small
    local = anomaly.LocalPixelModel()
    local.load_state_dict(reference["local_model"])
    elbo = anomaly.score(model, x, "elbo", samples=2, seed=5)
    with torch.no_grad():
        assert torch.allclose(anomaly.score(model, x, "complexity", samples=2, seed=5, reference=reference), elbo - 1.5 * local.nll(x), atol=1e-3)
        mu, _ = model.encode(x)
    distances = torch.cdist(mu, reference["codes"]).sort(1).values[:, :5].mean(1)
    assert torch.allclose(anomaly.score(model, x, "knn", reference=reference), distances, atol=1e-5)
    c = reference["calibration"]
    z = lambda v, name: (v - c[name][0]) / c[name][1]
    parts = {"elbo": elbo, "complexity": elbo - 1.5 * local.nll(x).detach(), "knn": distances}
    expected = torch.maximum((z(parts["complexity"], "complexity") + z(parts["knn"], "knn") - c["sum"][0]) / c["sum"][1], z(elbo, "elbo"))
    assert torch.allclose(anomaly.score(model, x, "combined", samples=2, seed=5, reference=reference), expected, atol=1e-3)
    assert reference["codes"].shape == (300, 4) and reference["local_weight"] == anomaly.LOCAL_WEIGHT == 1.5


def test_local_pixel_model_sees_only_pixels_above_and_to_the_left():
    """Changing a pixel may change the predictions of pixels after it in reading order, never its own or earlier ones."""
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
    """Fitted to images of vertical bars, it finds bars cheaper than the same pixels scattered at random."""
    bars = torch.zeros(200, 1, 28, 28)
    for i in range(200):
        bars[i, 0, 4:24, 4 + i % 20] = 1.0
    fitted = anomaly.fit_local_model(bars, steps=300)
    scattered = bars.flatten(1)[:, torch.randperm(784, generator=torch.Generator().manual_seed(0))].view_as(bars)
    with torch.no_grad():
        assert fitted.nll(bars).mean() < 0.5 * fitted.nll(scattered).mean()


@needs_mnist
@pytest.mark.parametrize("method", anomaly.METHODS)
def test_foreign_images_score_higher_than_test_digits(trained, method):
    model, ckpt = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    reference = ckpt["anomaly_reference"]  # stored in best.pt at the end of training
    digits = data.to_float(data.load_mnist(MNIST_DIR, download=False)["test_images"][:200])
    s_digits = anomaly.score(model, digits, method, samples=4, reference=reference)
    s_inverted = anomaly.score(model, 1 - digits[:20], method, samples=4, reference=reference)
    assert s_inverted.median() > torch.quantile(s_digits, 0.95)
    if method != "complexity":  # noise is as unlikely under the local pixel model as under the VAE: complexity alone
        # may excuse it (docs/anomaly.md), which is why `combined` takes the larger of its sum and the ELBO's z-score
        noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        assert anomaly.score(model, noise, method, samples=4, reference=reference).median() > torch.quantile(s_digits, 0.95)


@needs_mnist
def test_training_stores_the_test_digits_scores_for_percentiles(trained):
    """best.pt carries the 10,000 test digits' scores under the default method, so that a percentile needs no data."""
    model, ckpt = checkpoint.load_model(trained.ckpt_dir / "best.pt")
    stored = ckpt["anomaly_reference"]["test_scores"]
    digits = data.to_float(data.load_mnist(MNIST_DIR, download=False)["test_images"])
    assert len(stored) == 10000 and torch.equal(stored, stored.sort().values)
    assert torch.equal(anomaly.score(model, digits[:100], reference=ckpt["anomaly_reference"]),
                       anomaly.score(model, digits, reference=ckpt["anomaly_reference"])[:100])  # batch 100: the same noise
    assert anomaly.percentile(stored, stored[2499].item()) == pytest.approx(25.0, abs=0.5)
    assert anomaly.percentile(stored, stored.max().item()) == 100.0 and anomaly.percentile(stored, stored.min().item() - 1) == 0.0


def test_csv_is_reused_only_for_the_same_checkpoint_method_samples_and_seed(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights one")
    source = anomaly.provenance(ckpt, "elbo", 10, 0)
    labels, scores = torch.tensor([3, 1, 4]), torch.tensor([90.5, 40.25, 100.0])
    anomaly.write_csv(tmp_path / "anomaly_scores.csv", source, labels, scores)
    assert torch.equal(anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source, 3), scores)
    for other in (anomaly.provenance(ckpt, "complexity", 10, 0), anomaly.provenance(ckpt, "elbo", 5, 0), anomaly.provenance(ckpt, "elbo", 10, 1)):
        assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", other, 3) is None
    ckpt.write_bytes(b"weights two")  # retrained at the same path
    assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", anomaly.provenance(ckpt, "elbo", 10, 0), 3) is None
    assert anomaly.read_csv_scores(tmp_path / "anomaly_scores.csv", source, 4) is None  # not the expected number of rows


def test_csv_is_plain_for_any_csv_reader(tmp_path):
    """The first line is the header (csv.DictReader, pandas.read_csv); what produced the scores is in columns."""
    (tmp_path / "best.pt").write_bytes(b"weights")
    source = anomaly.provenance(tmp_path / "best.pt", "combined", 10, 0)
    anomaly.write_csv(tmp_path / "s.csv", source, torch.tensor([7, 2]), torch.tensor([1.5, -0.25]))
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [(r["index"], r["label"], float(r["score"]), r["method"]) for r in rows] == [("0", "7", 1.5, "combined"), ("1", "2", -0.25, "combined")]
    assert rows[0]["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()[:16]


@needs_mnist
def test_score_command_writes_csv_with_provenance_and_reconstruct_reuses_it(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    code, out, err = run_main(["score", "--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img",
                               "--samples", "2", "--method", "elbo"])
    assert code == 0, err
    source = anomaly.provenance(folder / "best.pt", "elbo", 2, 0)
    rows = list(csv.DictReader((folder / "anomaly_scores.csv").open()))
    assert len(rows) == 10000 and all({k: r[k] for k in source} == source for r in rows)
    assert "method elbo" in out and "percentiles" in out and "AUROC" not in out
    with Image.open(tmp_path / "img" / "anomalies.png") as img:
        assert img.width > 600 and np.asarray(img.convert("L")).std() > 10
    draw_digit((120, 90), "L", 255, 0, (30, 10, 80, 80)).save(tmp_path / "mine.png")
    same = ["reconstruct", tmp_path / "mine.png", "--checkpoint", folder / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img", "--samples", "2"]
    code, out, err = run_main(same + ["--method", "elbo"])
    assert code == 0 and "scoring the 10,000 test digits" not in out and "mine.png: elbo score" in out
    stored = anomaly.read_csv_scores(folder / "anomaly_scores.csv", source, 10000)
    value = float(out.split("elbo score ")[1].split(",")[0])
    percentile = float(out.split("percentile ")[1].split(" ")[0])
    assert percentile == pytest.approx(100 * (stored <= value).double().mean().item(), abs=0.05)
    code, out, err = run_main(same + ["--method", "complexity"])  # another method: the CSV is not reused
    assert code == 0 and "scoring the 10,000 test digits" in out and "mine.png: complexity score" in out


@needs_mnist
def test_held_out_digit_gets_the_auroc_of_its_scores(tmp_path):
    code, out, err = run_main(train_args(tmp_path, epochs=1) + ["--exclude-digit", "3", "--iwae-k", "1"])
    assert code == 0, err
    assert torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)["config"]["exclude_digit"] == 3
    code, out, err = run_main(["score", "--checkpoint", tmp_path / "ckpt" / "best.pt", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "img", "--samples", "1"])
    assert code == 0, err
    line = next(l for l in out.splitlines() if "AUROC" in l)
    rows = list(csv.DictReader((tmp_path / "ckpt" / "anomaly_scores.csv").open()))
    labels, scores = torch.tensor([int(r["label"]) for r in rows]), torch.tensor([float(r["score"]) for r in rows])
    assert "digit 3" in line and float(line.split("=")[-1]) == pytest.approx(anomaly.auroc(scores, labels == 3), abs=1e-3)
