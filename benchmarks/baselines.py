"""The reference point: pytorch/examples' VAE (vae/main.py), trained at this repository's budget,
scored the same way.

    python benchmarks/baselines.py --data-dir ../shared/mnist [--epochs 20] [--batch-size 64]

pytorch/examples' model, loss and optimizer as that script has them: an MLP 784-400-20 encoder and
20-400-784 decoder with ReLU, a sigmoid output, summed BCE + KL, Adam at 1e-3. Trained on the same
55,000 images main.py trains on (seed 1 split), for 20 epochs at batch 64 (its own defaults are 10
epochs at batch 128); like its script, the last epoch's weights are scored. Prints the test set's
negative ELBO per image in nats, z sampled (as evaluate.py does).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import data  # noqa: E402
from benchmarks.common import add_data_dir, parser, positive_int, run  # noqa: E402


class ExamplesVAE(nn.Module):
    """pytorch/examples vae/main.py's model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def loss_function(recon_x, x, mu, logvar) -> torch.Tensor:
    """Summed over the batch, as in pytorch/examples."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_data_dir(p)
    p.add_argument(
        "--epochs",
        type=positive_int(10_000),
        default=20,
        help="training epochs (default: 20, this repository's budget)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int(60_000),
        default=64,
        help="batch size (default: 64, this repository's budget)",
    )
    args = p.parse_args(argv)

    mnist = data.load_mnist(args.data_dir)
    train_idx, _ = data.split_indices(len(mnist["train_images"]), 5000, seed=1)
    train_x, test_x = mnist["train_images"][train_idx], data.to_float(mnist["test_images"])
    torch.manual_seed(1)
    model = ExamplesVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    shuffle = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for x in data.batches(train_x, args.batch_size, shuffle):
            recon, mu, logvar = model(x)
            loss = loss_function(recon, x, mu, logvar)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        print(f"epoch {epoch:2d}  train {total / len(train_x):.3f}", flush=True)
    with torch.no_grad():
        recon, mu, logvar = model(test_x, torch.Generator().manual_seed(1))
        test_loss = loss_function(recon, test_x, mu, logvar).item() / len(test_x)
    print(
        "model: pytorch/examples vae (MLP 784-400-20), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    print(f"epochs: {args.epochs}")
    print(f"batch_size: {args.batch_size}")
    print(f"test_loss: {test_loss:.3f}")
    print(f"minutes: {(time.perf_counter() - t0) / 60:.2f}")
    return 0


if __name__ == "__main__":
    run(main)
