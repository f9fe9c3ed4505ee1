"""Anomaly scores, the held-out-digit AUROC, and the user's own digit images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import main
import utils
from helpers import MNIST_DIR, needs_mnist, run_main, train_args
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
    assert utils.auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)) == pytest.approx(expected)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        utils.auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


@needs_mnist
def test_non_digits_score_higher_than_test_digits(trained):
    model = VAE.from_checkpoint(trained.ckpt_dir / "best.pt")
    digits = data.to_float(data.load_mnist(MNIST_DIR, download=False)["test_images"][:200])
    noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    square = torch.zeros(20, 1, 28, 28)
    square[:, :, 6:22, 6:22] = 1.0
    s_digits = main.anomaly_scores(model, digits, samples=4, seed=0)["score"]
    s_noise = main.anomaly_scores(model, noise, samples=4, seed=0)["score"]
    s_square = main.anomaly_scores(model, square, samples=4, seed=0)["score"]
    assert s_noise.min() > s_digits.max()
    assert s_square.median() > torch.quantile(s_digits, 0.95)


def test_scores_are_deterministic_for_a_seed_and_average_samples():
    torch.manual_seed(0)
    model = VAE(latent_dim=4, channels=(4, 8), hidden_dim=16).eval()
    x = torch.rand(10, 1, 28, 28)
    a, b = (main.anomaly_scores(model, x, samples=5, seed=1) for _ in range(2))
    assert torch.equal(a["score"], b["score"])
    c = main.anomaly_scores(model, x, samples=5, seed=2)
    assert not torch.equal(a["score"], c["score"])
    assert torch.allclose(a["score"], a["bce"] + a["kl"])


@needs_mnist
def test_score_command_writes_csv_and_picture(trained, tmp_path):
    code, out, err = run_main(["score", "--checkpoint", trained.ckpt_dir / "best.pt", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path, "--samples", "2"])
    assert code == 0, err
    lines = (trained.ckpt_dir / "anomaly_scores.csv").read_text().splitlines()
    assert lines[0] == "index,label,score,bce,kl" and len(lines) == 10001
    index, label, score, bce, kl = lines[1].split(",")
    assert index == "0" and 0 <= int(label) <= 9 and float(score) == pytest.approx(float(bce) + float(kl), abs=2e-4)
    assert "percentiles" in out and "mean score by digit" in out and "AUROC" not in out
    with Image.open(tmp_path / "anomalies.png") as img:
        assert img.width > 600 and np.asarray(img.convert("L")).std() > 10


@needs_mnist
def test_held_out_digit_is_recorded_and_gets_an_auroc(tmp_path):
    code, out, err = run_main(train_args(tmp_path, epochs=1) + ["--exclude-digit", "3", "--iwae-k", "1"])
    assert code == 0, err
    ckpt = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    assert ckpt["config"]["exclude_digit"] == 3
    code, out, err = run_main(["score", "--checkpoint", tmp_path / "ckpt" / "best.pt", "--data-dir", MNIST_DIR,
                               "--image-dir", tmp_path / "img", "--samples", "1"])
    assert code == 0, err
    line = next(l for l in out.splitlines() if "AUROC" in l)
    auc = float(line.split("=")[-1])
    assert "digit 3" in line and 0.0 <= auc <= 1.0


@needs_mnist
def test_reconstruct_command_processes_good_files_and_reports_bad_ones(trained, tmp_path):
    draw_digit((120, 90), "RGBA", (255, 255, 255, 255), (0, 0, 0, 255), (30, 10, 80, 80)).save(tmp_path / "mine.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "readme.txt").write_text("not a picture")
    code, out, err = run_main(["reconstruct", tmp_path / "broken.png", tmp_path / "mine.png", tmp_path / "readme.txt",
                               "--checkpoint", trained.ckpt_dir / "best.pt", "--data-dir", MNIST_DIR, "--image-dir", tmp_path / "img", "--samples", "2"])
    assert code == 2
    assert err.count("\n") == 2 and "broken.png" in err and "readme.txt" in err and "Traceback" not in err
    assert "mine.png: score" in out and "percentile" in out
    with Image.open(tmp_path / "img" / "reconstructed_mine.png") as img:
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10
