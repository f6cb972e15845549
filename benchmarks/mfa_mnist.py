"""A mixture of factor analysers on MNIST against one factor analyser and a diagonal Gaussian
mixture: held-out log-likelihood, and seconds per EM iteration beside scikit-learn's.

All three fit the same training images (scaled to [0, 1], dequantised once with uniform noise
of one grey level) and are scored by the exact mean log-likelihood per example (and bits per
dimension on the 256-level grid) on the 10,000 test images, dequantised the same way:

- vaeflow ``MixtureOfFactorAnalyzers(K=10, M=10)``: the Lightning fit, k-means start included;
  seconds per EM iteration is the median duration of its EM passes;
- vaeflow ``FactorAnalysis(M=10)``;
- scikit-learn ``GaussianMixture(10, "diag")`` (k-means start); seconds per iteration is its
  fit time over its iterations, k-means start included, so it is an upper bound.

    python benchmarks/mfa_mnist.py --root data   # <root>/MNIST/raw/*.gz
    python benchmarks/mfa_mnist.py --root data --examples 10000 --max-iter 30   # a few minutes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from fa_mnist import mnist_for_fa
from lightning.pytorch import Callback, LightningModule, Trainer
from sklearn.mixture import GaussianMixture

from vaeflow.models import FactorAnalysis, MixtureOfFactorAnalyzers


class PassClock(Callback):
    """The wall-clock seconds of every training epoch (one pass over the data)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def fit(model: LightningModule, x: torch.Tensor) -> tuple[float, list[float]]:
    """Seconds of the whole fit and of each pass."""
    clock = PassClock()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    chunks = [x[i : i + 10_000] for i in range(0, len(x), 10_000)]  # views, no per-row Python
    loader = torch.utils.data.DataLoader(chunks, batch_size=None)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - start, clock.seconds


def bits(ll: float, dim: int) -> float:
    return (dim * math.log(256) - ll) / (dim * math.log(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--examples", type=int, default=60_000, help="first N training images")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args()
    data = mnist_for_fa(args.root)
    data.setup("test")
    x, test = data.splits["train"][: args.examples], data.splits["test"]
    x, test = x.reshape(len(x), -1).double(), test.reshape(len(test), -1).double()
    dim = x.shape[1]
    rows = []

    mfa = MixtureOfFactorAnalyzers((dim,), args.components, args.latent_dim, max_iter=args.max_iter)
    seconds, passes = fit(mfa, x)
    em_passes = passes[mfa.hparams.kmeans_iter + 1 :]
    ll = mfa.log_likelihood(test).mean().item()
    rows.append(
        ("vaeflow MFA", ll, seconds, statistics.median(em_passes), len(em_passes), mfa.stop_reason)
    )

    fa = FactorAnalysis((dim,), latent_dim=args.latent_dim)
    seconds, _ = fit(fa, x)
    ll = fa.log_likelihood(test).mean().item()
    rows.append(("vaeflow FA", ll, seconds, float("nan"), int(fa.n_iter), fa.stop_reason))

    start = time.perf_counter()
    gmm = GaussianMixture(
        args.components, covariance_type="diag", max_iter=args.max_iter, random_state=0
    ).fit(x.numpy())
    seconds = time.perf_counter() - start
    ll = gmm.score(test.numpy())
    rows.append(("sklearn GMM diag", ll, seconds, seconds / gmm.n_iter_, gmm.n_iter_, ""))

    print(
        f"MNIST, {len(x)} training and {len(test)} test images, K = {args.components}, "
        f"M = {args.latent_dim}"
    )
    print("| model | test nats/example | bits/dim | fit (s) | s per EM iteration | iterations |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, ll, seconds, per_iter, iterations, reason in rows:
        print(
            f"| {name} | {ll:.1f} | {bits(ll, dim):.3f} | {seconds:.1f} | {per_iter:.2f} | "
            f"{iterations} {reason} |"
        )


if __name__ == "__main__":
    main()
