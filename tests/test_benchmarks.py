"""The benchmark scripts run and print sane `name: value` figures (tiny settings: a smoke test, not
a measurement), a mistake in their flags is one line and status 2, and the project's structure has
no circles or upward arrows."""

import ast
import importlib
import os
import subprocess
import sys

import pytest
from helpers import MNIST_DIR, ROOT, needs_mnist

import anomaly
import data
import train
from benchmarks import structure
from benchmarks.common import run
from config import TrainConfig, VAEConfig

TABLE = """\
structure: --verbose
upsampling: --device cpu --windows 1 --steps 1 --batch-size 8
demo_speed: --checkpoint pretrained/vae-mnist.pt --updates 3
train_speed: --data-dir DATA --windows 1 --steps 2 --warmup 1 --matmul-size 256 --eval-images 20
  --latent-dim 8 --channels 8 16 --hidden-dim 32 --res-blocks 0 --out-conv 0
baselines: --data-dir DATA --epochs 1 --batch-size 512
quality: --data-dir DATA --reuse RUN --iwae-k 3
anomaly_auroc: --data-dir DATA RUN --max-images 300
photos: --data-dir DATA --n 3"""  # DATA: $MNIST_DIR; RUN: a run trained here
# an indented line continues
SETTINGS = dict(line.split(": ") for line in TABLE.replace("\n  ", " ").splitlines())
CHECKS = {  # of the figures f a script printed, n(name) being the number f[name] starts with
    "structure": lambda f, n: (
        f["circles"] == f["upward arrows"] == "none" and n("reachable_from_train_train") > 5
    ),
    # 3 places, 3 figures each
    "upsampling": lambda f, n: sum(n(name) > 0 for name in f if "_at_" in name) == 9,
    "demo_speed": lambda f, n: (
        "shipped model" in f["checkpoint"] and 0 < n("median_ms") <= n("p95_ms")
    ),
    "train_speed": lambda f, n: (
        "hidden_dim=32" in f["model"]
        and n("speedup_over_naive") > 0
        and 0 < n("project_mfu_percent") < 100
    ),
    # trained: 104
    "baselines": lambda f, n: "652,824 parameters" in f["model"] and 100 < n("test_loss") < 300,
    "quality": lambda f, n: (
        n("test_iwae_nll") <= n("test_loss") + 1 and f["iwae_k"] == "3" and f["epochs"] == "1"
    ),
    "anomaly_auroc": lambda f, n: all(
        0 <= n(f"digit_3_{m}_letters_auroc") <= 1 for m in anomaly.METHODS
    ),
    "photos": lambda f, n: "photos_minus_clean" in f and n("prepare_digit per photo") > 0,
}
MISTAKES = "train_speed --out-conv x, quality --latent-dim 0, upsampling --windows 0, baselines --epochs x, "
MISTAKES += "anomaly_auroc --max-images 0 R, structure --bogus, demo_speed --checkpoint nowhere.pt, photos --n 0"


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """All started at once, once the run some of them measure is trained; each test waits for its
    own."""

    def start(script: str, folder) -> subprocess.Popen:
        argv = [{"RUN": str(folder), "DATA": MNIST_DIR}.get(a, a) for a in SETTINGS[script].split()]
        env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *argv]
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    folder = tmp_path_factory.mktemp("run")
    # one epoch of a small VAE on 300 images without digit 3, through train.start and train.train
    if MNIST_DIR:
        mnist, c = (
            data.load_mnist(MNIST_DIR),
            TrainConfig(epochs=1, subset=300, val_size=300, exclude_digit=3, ema=0),
        )
        split = data.run_split(mnist["train_labels"], c.val_size, c.seed, c.exclude_digit, c.subset)
        small = VAEConfig(latent_dim=8, channels=(8, 16), hidden_dim=32)
        train.train(
            train.start(c, small, tuple(mnist["train_images"][i] for i in split), folder),
            show_progress=False,
        )
    procs = {s: start(s, folder) for s, argv in SETTINGS.items() if MNIST_DIR or "DATA" not in argv}
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=[needs_mnist] * ("DATA" in a)) for s, a in SETTINGS.items()]
)
def test_each_script_prints_sane_figures(started, script):
    out, err = started[script].communicate(timeout=600)
    assert started[script].returncode == 0, err
    f = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert CHECKS[script](f, lambda name: float(f[name].split()[0])), out


@pytest.mark.parametrize("mistake", MISTAKES.split(", "))
def test_a_mistake_is_one_line_and_status_2(mistake, capsys):
    script, *argv = mistake.split()
    with pytest.raises(SystemExit) as stop:
        run(importlib.import_module(f"benchmarks.{script}").main, argv)
    assert (
        (err := capsys.readouterr().err).count("\n") == 1
        and stop.value.code == 2
        and argv[0] in err
    ), err


def test_structure_finds_circles_upward_arrows_imports_in_functions_and_calls():
    assert structure.find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "b"}}) == [
        ["a", "b", "c", "a"],
        ["b", "c", "b"],
    ]
    # not data's
    assert (
        len(structure.upward_arrows({"files": {"model"}, "model": {"data"}, "data": {"model"}}))
        == 2
    )
    # an import inside a function, a call through it
    model = ast.parse("def f():\n    import data as d\n    d.g()\n")
    defs = structure.Defs(
        {"model": model, "data": ast.parse("from model import f as h\ndef g():\n    h()\n")}
    )
    assert structure.imported_names(model) == {"data"} and defs.reachable("model.f") == {
        "model.f",
        "data.g",
    }
