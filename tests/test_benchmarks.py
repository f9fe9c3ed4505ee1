"""Benchmark scripts: sane figures, a mistake in their flags in one line, structure's parts."""

import ast
import os
import sys
from subprocess import PIPE, Popen

import pytest
from helpers import MNIST_DIR, ROOT, finish, needs_mnist

import data
import train
from anomaly import METHODS
from benchmarks import structure
from config import TrainConfig, VAEConfig

TABLE = """\
structure: --verbose | --bogus
upsampling: --device cpu --windows 1 --steps 1 --batch-size 8 | --windows 0
demo_speed: --checkpoint pretrained/vae-mnist.pt --updates 3 | --checkpoint nowhere.pt
drawings: --scans 0 --only digit dot disc letter | --scans -1
train_speed: --data-dir DATA --windows 1 --steps 2 --warmup 1 --matmul-size 256 --eval-images 20
  --latent-dim 8 --channels 8 16 --hidden-dim 32 --res-blocks 0 --out-conv 0 | --out-conv x
baselines: --data-dir DATA --epochs 1 --batch-size 512 | --epochs x
quality: --data-dir DATA --reuse RUN --iwae-k 3 | --latent-dim 0
anomaly_auroc: --data-dir DATA RUN --max-images 300 | --max-images 0 R
photos: --data-dir DATA --n 3 | --n 0"""  # DATA: $MNIST_DIR; RUN: a run trained here; | a mistake
ROWS = [line.split(": ") for line in TABLE.replace("\n  ", " ").splitlines()]  # indented: continued
ARGS = {(s, m): row.split(" | ")[m].split() for s, row in ROWS for m in (False, True)}
RUNS = [pytest.param(*key, marks=[needs_mnist] * ("DATA" in a)) for key, a in ARGS.items()]
CHECKS = {  # of the figures f a script printed, n(name) being the number f[name] starts with
    "structure": lambda f, n: (
        f["circles"] + f["upward arrows"] == "nonenone" and n("reachable_from_train_train") > 5
    ),
    "upsampling": lambda f, n: sum(n(name) > 0 for name in f if "_at_" in name) == 9,  # 3 x 3
    "demo_speed": lambda f, n: "shipped" in f["checkpoint"] and 0 < n("median_ms") <= n("p95_ms"),
    # the shipped model flags a dot and a filled disc (a dot was scaled up to fill the box)
    "drawings": lambda f, n: all("unusual" in f[k] for k in ("dot", "filled disc", "letter K")),
    "train_speed": lambda f, n: (
        "hidden_dim=32" in f["model"]
        and n("speedup_over_naive") > 0 < n("project_mfu_percent") < 100
    ),
    "baselines": lambda f, n: "652,824 parameters" in f["model"] and 100 < n("test_loss") < 300,
    "quality": lambda f, n: n("test_iwae_nll") <= n("test_loss") + 1 and f["iwae_k"] == "3",
    "anomaly_auroc": lambda f, n: all(0 <= n(f"digit_3_{m}_letters_auroc") <= 1 for m in METHODS),
    "photos": lambda f, n: "photos_minus_clean" in f and n("prepare_digit per photo") > 0,
}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    folder, env = tmp_path_factory.mktemp("run"), {"OMP_NUM_THREADS": "1"} | os.environ
    if MNIST_DIR:  # the run some measure; then all start at once
        c = TrainConfig(epochs=1, subset=300, val_size=300, exclude_digit=3, ema=0)
        small = VAEConfig(latent_dim=8, channels=(8, 16), hidden_dim=32)
        train.train(train.start(c, small, data.load_mnist(MNIST_DIR), folder), show_progress=False)
    procs, given = {}, {"RUN": str(folder), "DATA": MNIST_DIR}
    for key, args in ARGS.items():
        if MNIST_DIR or "DATA" not in args:
            cmd = [sys.executable, f"benchmarks/{key[0]}.py", *map(given.get, args, args)]
            procs[key] = Popen(cmd, cwd=ROOT, env=env, text=True, stdout=PIPE, stderr=PIPE)
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("script,mistake", RUNS)
def test_a_script_prints_sane_figures_or_a_mistake_in_one_line(started, script, mistake):
    code, out, err = finish(started[script, mistake], timeout=600)
    f = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    sane = code == 0 and CHECKS[script](f, lambda name: float(f[name].split()[0]))
    one_line = code == 2 and err.count("\n") == 1 and ARGS[script, True][0] in err
    assert one_line if mistake else sane, out + err


def test_structure_finds_circles_upward_arrows_imports_in_functions_and_calls():
    assert structure.find_cycles(dict(a={"b"}, b={"c"}, c={"a", "b"})) == [[*"abca"], [*"bcb"]]
    assert len(structure.upward_arrows(dict(files={"model"}, model={"data"}, data={"model"}))) == 2
    model = ast.parse("def f():\n    import data as d\n    d.g()\n")  # a call through an import
    data_module = ast.parse("from model import f as h\ndef g(): h()")
    reached = structure.Defs({"model": model, "data": data_module}).reachable("model.f")
    assert structure.imported_names(model) == {"data"} and reached == {"model.f", "data.g"}
