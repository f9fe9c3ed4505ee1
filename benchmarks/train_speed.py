"""Training speed of the project's loop against a naive PyTorch loop, with FLOPs and MFU.

    python benchmarks/train_speed.py --data-dir ../shared/mnist [--full-run]
                                     [main.py model flags, --ema]

Prints one `name: value` line per figure, so runs can be compared. Everything runs in one process on
the current device with the default model at batch 64 (or the one main.py's model flags and --ema
describe, e.g. `--hidden-dim 512 --out-conv 0 --ema 0` for the model docs/model-selection.md started
from):
  - the project's training step (in-memory uint8 data, channels-last, fused Adam, no per-step host
    sync, and bf16 autocast where main.py's --precision auto picks it),
  - a naive baseline as pytorch/examples writes it: torchvision datasets.MNIST + ToTensor +
    DataLoader(shuffle=True), the same model and loss, default Adam, loss.item() every step,
  - model FLOPs per image (forward + backward) from torch.utils.flop_counter, achieved GFLOP/s, and
    MFU against the fp32 matmul peak measured here on the spot (as nanoGPT reports MFU); with bf16,
    also against the bf16 peak,
  - evaluation throughput, and the time of a full default run (measured with --full-run, else
    extrapolated).
The project's loop is set up by train.start and stepped by train.train_step, as `python main.py`
trains.
"""

from __future__ import annotations

import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import checkpoint  # noqa: E402
import config as settings  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import main as cli  # noqa: E402
import mnist_files  # noqa: E402
import train  # noqa: E402
from benchmarks.common import add_data_dir, main_py, parser, positive_int, run, sync  # noqa: E402
from config import TrainConfig, VAEConfig, pick_device, resolve_precision  # noqa: E402  # noqa: E402
from files import UserError  # noqa: E402
from model import VAE, mean_neg_elbo, neg_elbo_terms  # noqa: E402


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10
) -> float:
    """Best throughput of a large square matmul in `dtype`: the machine's practical peak for MFU."""
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    best = 0.0
    for _ in range(3):
        a @ b
    for size in (n, 2 * n) if device.type == "cpu" else (2 * n, 4 * n):
        a, b = (
            torch.randn(size, size, device=device, dtype=dtype),
            torch.randn(size, size, device=device, dtype=dtype),
        )
        a @ b
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def timed_windows(
    step, batches, device: torch.device, warmup: int, windows: int, steps: int, batch_size: int
) -> float:
    """Median images/s over `windows` timed windows of `steps` steps, after `warmup` steps."""
    it = iter(batches())

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(batches())
            return next(it)

    for _ in range(warmup):
        step(next_batch())
    sync(device)
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            step(next_batch())
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - t))
    return statistics.median(rates)


def torchvision_root(data_dir: str, tmp: Path) -> str:
    """A folder in torchvision's MNIST layout (MNIST/raw with uncompressed files) built from
    data_dir's files."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in mnist_files.find_mnist_files(data_dir).items():
        if path is None:
            raise UserError(f"{data_dir}: missing {name}")
        payload = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        (raw / name).write_bytes(payload)
    return str(tmp)


def model_settings(args, model_flags: list[str], init: dict | None) -> tuple[VAEConfig, float]:
    """The architecture and --ema to time: the checkpoint's with --init, else main.py's flags over
    its defaults (parsed and checked by main.py's own parser: a bad flag is one line)."""
    if init is not None:
        return checkpoint.model_config(init), init["config"]["ema"]
    chosen = vars(cli.build_parsers()["train"].parse_args(model_flags))
    given = {f.name: chosen[f.name] for f in fields(VAEConfig) if chosen[f.name] is not None}
    config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    try:
        settings.check(config)
    except ValueError as err:
        raise UserError(str(err)) from None
    return config, TrainConfig.ema if chosen["ema"] is None else chosen["ema"]


def naive_loop(
    args, config: VAEConfig, init: dict | None, device: torch.device, batches_from
) -> float:
    """pytorch/examples' way: torchvision's MNIST through a shuffling DataLoader, default Adam,
    loss.item() every step, no flushing of denormals. Its images/s."""
    from torchvision import datasets, transforms

    tmp = Path(tempfile.mkdtemp())
    try:
        root = torchvision_root(args.data_dir, tmp)
        dataset = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
        torch.manual_seed(0)
        naive = VAE(**asdict(config)).to(device)
        naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-3)
        if init is not None:
            naive.load_state_dict(init.get("train_weights", init["model"]))
            naive_opt.load_state_dict(init["optimizer"])
            # the saved groups say fused=True; the naive loop keeps the default
            for group in naive_opt.param_groups:
                group["fused"], group["foreach"] = None, None
        total = [0.0]

        def naive_step(batch):
            xb = batch[0].to(device)
            naive_opt.zero_grad()
            logits, mu, logvar = naive(xb)
            bce, kl = neg_elbo_terms(logits, xb, mu, logvar)
            loss = (bce + kl).mean()
            loss.backward()
            total[0] += loss.item()
            naive_opt.step()

        torch.set_flush_denormal(False)
        return batches_from(naive_step, lambda: loader)
    finally:
        torch.set_flush_denormal(True)
        shutil.rmtree(tmp)


def full_run(args, model_flags: list[str]) -> tuple[float, str]:
    """A real default `python main.py` run in a temporary folder: wall-clock seconds and the test
    loss it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = main_py(args)
        cmd += ["--precision", args.precision, *model_flags, "--checkpoint-dir", f"{tmp}/ckpt"]
        cmd += ["--image-dir", f"{tmp}/img", "--no-progress"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise UserError(
            f"the full run failed (status {proc.returncode}): {proc.stderr.strip()[-300:]}"
        )
    loss_line = next(
        line for line in proc.stdout.splitlines() if "negative ELBO (test loss)" in line
    )
    return wall, loss_line.split()[-1]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_data_dir(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=positive_int(4096), default=64)
    p.add_argument(
        "--windows",
        type=positive_int(),
        default=5,
        help="timed windows per loop; the median is reported (default: 5)",
    )
    p.add_argument(
        "--steps", type=positive_int(), default=60, help="steps per timed window (default: 60)"
    )
    p.add_argument(
        "--warmup", type=positive_int(), default=30, help="untimed steps first (default: 30)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="the project's training step arithmetic, as main.py's --precision (default: auto)",
    )
    p.add_argument(
        "--matmul-size",
        type=positive_int(16_384),
        default=2048,
        help="side of the square matmul whose best rate is the peak for MFU; 2N is tried too "
        "(default: 2048)",
    )
    p.add_argument(
        "--eval-images",
        type=positive_int(10_000),
        default=1000,
        help="test images whose IWAE evaluation (k=100) is timed and extrapolated to 10,000 "
        "(default: 1000)",
    )
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the naive torchvision loop",
    )
    p.add_argument(
        "--full-run",
        action="store_true",
        help="also time a real full default run of main.py (20 epochs + evaluation + pictures)",
    )
    p.add_argument(
        "--init",
        metavar="CKPT",
        help="start both loops from this checkpoint's weights and Adam state "
        "(steady-state training, where "
        "denormals have built up) instead of fresh weights",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's table of where the project's training step spends its time",
    )
    args, model_flags = p.parse_known_args(argv)
    init = checkpoint.load(args.init, flag="--init") if args.init else None
    if init is not None and "optimizer" not in init:
        raise UserError(
            f"--init {args.init}: holds no Adam state (a trimmed file); "
            "pass a run's best.pt or last.pt"
        )
    config, ema = model_settings(args, model_flags, init)

    device = pick_device(args.device)
    torch.set_flush_denormal(True)  # as train.train does; off again for the naive loop below
    print(
        f"device: {device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}"
    )
    print(f"torch: {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"batch_size: {args.batch_size}")
    precision = resolve_precision(args.precision, device)
    print(f"precision: {precision}")
    mnist = data.load_mnist(args.data_dir)
    print(f"model: {config}")

    # --- the project's loop, set up as main.py sets up a run (it writes nothing: only train.save
    # would) ---
    run_config = TrainConfig(batch_size=args.batch_size, ema=ema, precision=precision, seed=0)
    project = train.start(run_config, config, mnist, folder=Path("unused"), device=device)
    if init is not None:
        print(f"init: {args.init} (epoch {init['epoch']})")
        project.model.load_state_dict(init.get("train_weights", init["model"]))
        project.optimizer.load_state_dict(init["optimizer"])
    print(f"ema: {ema}")

    # --- FLOPs of one training step, counted (not estimated) ---
    torch.manual_seed(0)
    probe = VAE(**asdict(config)).to(device)
    x = data.to_float(project.train_x[: args.batch_size])
    with FlopCounterMode(display=False) as counter:
        logits, mu, logvar = probe(x)
        bce, kl = neg_elbo_terms(logits, x, mu, logvar)
        (bce + kl).mean().backward()
    flops_per_image = counter.get_total_flops() / args.batch_size
    print(f"model_flops_per_image_fwd_bwd: {flops_per_image / 1e6:.2f} M")

    peak = matmul_peak_gflops(device, n=args.matmul_size)
    print(f"fp32_matmul_peak_gflops: {peak:.1f}")
    peak_bf16 = (
        matmul_peak_gflops(device, torch.bfloat16, n=args.matmul_size)
        if precision == "bf16"
        else None
    )
    if peak_bf16:
        print(f"bf16_matmul_peak_gflops: {peak_bf16:.1f}")

    def batches_from(step, batches) -> float:
        return timed_windows(
            step, batches, device, args.warmup, args.windows, args.steps, args.batch_size
        )

    noise, shuffle = project.generators["noise"], project.generators["shuffle"]

    def step(xb):
        train.train_step(
            project.model, project.optimizer, project.average, xb, noise, 1.0, precision
        )

    project_ips = batches_from(
        step, lambda: data.batches(project.train_x, args.batch_size, shuffle)
    )
    print(f"project_images_per_second: {project_ips:.0f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        it = data.batches(project.train_x, args.batch_size, shuffle)
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with profile(activities=activities) as prof:
            for _ in range(50):
                step(next(it))
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    print(f"project_achieved_gflops: {flops_per_image * project_ips / 1e9:.1f}")
    # of the fp32 peak
    print(f"project_mfu_percent: {100 * flops_per_image * project_ips / 1e9 / peak:.1f}")
    if peak_bf16:
        print(
            "project_mfu_percent_of_bf16_peak: "
            f"{100 * flops_per_image * project_ips / 1e9 / peak_bf16:.1f}"
        )

    # --- the naive loop ---
    if args.baseline:
        naive_ips = naive_loop(args, config, init, device, batches_from)
        print(f"naive_images_per_second: {naive_ips:.0f}")
        print(f"naive_mfu_percent: {100 * flops_per_image * naive_ips / 1e9 / peak:.1f}")
        print(f"speedup_over_naive: {project_ips / naive_ips:.2f}")

    # --- evaluation throughput (test-set negative ELBO, as validation computes it) ---
    test_x = data.to_float(mnist["test_images"].to(device))
    model = project.model.eval()
    mean_neg_elbo(model, test_x[:2000], seed=0)
    sync(device)
    t = time.perf_counter()
    mean_neg_elbo(model, test_x, seed=0)
    sync(device)
    eval_seconds = time.perf_counter() - t
    print(f"eval_images_per_second: {len(test_x) / eval_seconds:.0f}")
    t = time.perf_counter()
    evaluate.test_metrics(model, test_x[: args.eval_images], iwae_k=100, seed=0)
    sync(device)
    final_eval_seconds = (time.perf_counter() - t) * len(test_x) / args.eval_images
    what = f"extrapolated from {args.eval_images:,} test images"
    print(f"final_evaluation_seconds_k100: {final_eval_seconds:.1f} ({what})")

    epoch_seconds = 55000 / project_ips + 5000 / len(test_x) * eval_seconds
    print(
        f"epoch_seconds: {epoch_seconds:.1f} "
        "(extrapolated: 55,000 training steps' images at the measured rate "
        "+ validation)"
    )
    full = (20 * epoch_seconds + final_eval_seconds) / 60
    what = "20 epochs + final evaluation; data loading and pictures not included"
    print(f"full_run_minutes_extrapolated: {full:.2f} ({what})")

    if args.full_run:
        wall, test_loss = full_run(args, model_flags)
        what = "python main.py, 20 epochs + evaluation + pictures, wall clock"
        print(f"full_run_minutes_measured: {wall / 60:.2f} ({what})")
        print(f"full_run_test_loss: {test_loss}")
    return 0


if __name__ == "__main__":
    run(main)
