"""The benchmark scripts run and print their `name: value` figures (tiny settings: a smoke test, not a measurement)."""
from __future__ import annotations

import subprocess
import sys

from helpers import MNIST_DIR, ROOT, needs_mnist


def figures(stdout: str) -> dict[str, str]:
    return {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in stdout.splitlines() if ": " in line}


@needs_mnist
def test_train_speed_prints_every_figure():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--data-dir", MNIST_DIR,
                           "--windows", "1", "--steps", "3", "--warmup", "1", "--hidden-dim", "64", "--ema", "0.9"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    f = figures(proc.stdout)
    assert "hidden_dim=64" in f["model"] and f["ema"] == "0.9"  # main.py's model flags and --ema pass through
    for key in ("project_images_per_second", "naive_images_per_second", "speedup_over_naive", "model_flops_per_image_fwd_bwd",
                "fp32_matmul_peak_gflops", "project_mfu_percent", "eval_images_per_second", "full_run_minutes_extrapolated"):
        assert key in f, key
    assert float(f["project_images_per_second"]) > 0 and 0 < float(f["project_mfu_percent"]) < 100


@needs_mnist
def test_quality_measures_a_finished_run(trained):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--data-dir", MNIST_DIR,
                           "--reuse", str(trained.ckpt_dir), "--iwae-k", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    f = figures(proc.stdout)
    assert float(f["test_iwae_nll"]) <= float(f["test_loss"]) + 1.0
    assert f["iwae_k"] == "3" and f["epochs"] == "2" and "active_units" in f


@needs_mnist
def test_train_speed_rejects_a_bad_model_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--data-dir", MNIST_DIR, "--out-conv", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--out-conv" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_upsampling_times_both_ways_in_every_decoder_place():
    """Needs no data: it times the decoder's upsampling layers on random inputs of the default model's shapes."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "upsampling.py"), "--device", "cpu", "--windows", "1", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    f = figures(proc.stdout)
    for place in ("32to32_at_7to14", "32to16_at_14to28", "32to1_at_14to28"):  # the default's two, and --out-conv 0's last
        assert float(f[f"transposed_conv_{place}_ms"]) > 0 and float(f[f"upsample_conv_{place}_ms"]) > 0
        assert float(f[f"upsample_conv_over_transposed_{place}"]) > 0


@needs_mnist
def test_baselines_trains_the_pytorch_examples_vae_and_prints_its_test_loss():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--data-dir", MNIST_DIR, "--epochs", "1",
                           "--batch-size", "512"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    f = figures(proc.stdout)
    assert f["epochs"] == "1" and f["batch_size"] == "512" and "652,824 parameters" in f["model"]
    assert 100 < float(f["test_loss"]) < 300  # one epoch of the MLP: well trained it reaches about 104
