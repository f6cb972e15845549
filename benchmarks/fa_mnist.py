"""Factor analysis of MNIST: vaeflow EM against scikit-learn FactorAnalysis, same data, same run.

Both fit the 60,000 training images (scaled to [0, 1], dequantised once with uniform noise of one
grey level, M = 32 factors) and are scored by the exact mean log-likelihood per example on those
images. Fit time excludes imports and data loading; vaeflow's includes the whole Lightning fit
(moment pass, eigendecomposition, EM to convergence). A second comparison is the user's path:
the same images saved as an .npy file, fitted by `vaeflow fit` from a YAML of only
ArrayDataModule(path, val_fraction=0) and FactorAnalysis(latent_dim) (CLI, loading, fit,
checkpoint), against scikit-learn loading the same .npy and fitting it.

    python benchmarks/fa_mnist.py --root data   # <root>/MNIST/raw/*.gz, as MNISTDataModule reads
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning.pytorch import Trainer
from sklearn.decomposition import FactorAnalysis as SklearnFA
from threadpoolctl import threadpool_limits

from vaeflow.cli import main as vaeflow_main
from vaeflow.data import MNISTDataModule
from vaeflow.metrics import bits_per_dim
from vaeflow.models import FactorAnalysis

#: `vaeflow fit`'s config on the user's .npy: the data file, no validation rows (so that both
#: fit all 60,000 rows, as scikit-learn does) and the latent size.
USER_YAML = """\
data:
  class_path: vaeflow.data.ArrayDataModule
  init_args:
    path: {path}
    val_fraction: 0.0
model:
  class_path: vaeflow.models.FactorAnalysis
  init_args:
    latent_dim: {latent_dim}
"""


def fit_vaeflow(data: MNISTDataModule, latent_dim: int) -> tuple[float, FactorAnalysis]:
    model = FactorAnalysis(data.dims, latent_dim=latent_dim)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start, model


def fit_user_path(folder: Path, x: np.ndarray, latent_dim: int) -> tuple[float, float, float]:
    """Seconds of `vaeflow fit` on an .npy (from the CLI call to the end, loading included),
    its log-likelihood on the file's rows, and scikit-learn's seconds to load and fit it."""
    path = folder / "mnist.npy"
    np.save(path, x)
    config = folder / "run.yaml"
    config.write_text(USER_YAML.format(path=path, latent_dim=latent_dim))
    root = folder / f"runs_{time.monotonic_ns()}"
    args = ["fit", "--config", str(config), "--trainer.enable_progress_bar", "false"]
    args += [
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
    ]
    start = time.perf_counter()
    vaeflow_main(args)
    seconds = time.perf_counter() - start
    checkpoint = next(root.rglob("epoch=*.ckpt"))
    model = FactorAnalysis.load_from_checkpoint(checkpoint)
    ll = model.log_likelihood(torch.from_numpy(x)).mean().item()
    start = time.perf_counter()
    SklearnFA(latent_dim, random_state=0).fit(np.load(path))
    return seconds, ll, time.perf_counter() - start


class Comparison(NamedTuple):
    """Medians of alternated fits of vaeflow and scikit-learn on the same rows."""

    seconds: float
    sklearn_seconds: float
    model: FactorAnalysis
    reference: SklearnFA
    times: dict[str, list[float]]


def mnist_for_fa(root: str, download: bool = False, batch_size: int = 10_000) -> MNISTDataModule:
    """MNIST's training images scaled to [0, 1] and dequantised once, set up."""
    data = MNISTDataModule(
        root=root,
        download=download,
        dequantize="static",
        val_fraction=0.0,
        batch_size=batch_size,
        shuffle=False,  # EM's sums do not depend on the order: batches are views
    )
    data.prepare_data()
    data.setup("fit")
    return data


def alternate_fits(data: MNISTDataModule, latent_dim: int, repeats: int) -> Comparison:
    """Alternate the two fits and take medians: on a shared machine the load of other
    processes changes from one fit to the next."""
    x64 = data.splits["train"].double().numpy()
    times: dict[str, list[float]] = {"vaeflow": [], "sklearn": []}
    for _ in range(repeats):
        seconds, model = fit_vaeflow(data, latent_dim)
        times["vaeflow"].append(seconds)
        start = time.perf_counter()
        reference = SklearnFA(latent_dim, random_state=0).fit(x64)
        times["sklearn"].append(time.perf_counter() - start)
    seconds, sk_seconds = (statistics.median(times[name]) for name in ("vaeflow", "sklearn"))
    return Comparison(seconds, sk_seconds, model, reference, times)


def bits(log_likelihood: float, dims: int, log_scale: float) -> float:
    return bits_per_dim(torch.tensor(log_likelihood, dtype=torch.float64), dims, log_scale).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="fits of each; medians reported")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and BLAS threads for both (default: all)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # OpenBLAS behind numpy, SciPy and scikit-learn

    data = mnist_for_fa(args.root, args.download, args.batch_size)
    x = data.splits["train"]
    x64 = x.double().numpy()
    print(
        f"MNIST train: {tuple(x.shape)}, M = {args.latent_dim}, torch threads = "
        f"{torch.get_num_threads()}"
    )
    comparison = alternate_fits(data, args.latent_dim, args.repeats)
    seconds, sk_seconds, model, reference, times = comparison
    ll = model.log_likelihood(x).mean().item()
    iterations = int(model.n_iter)
    sk_ll = reference.score(x64)
    print("fit seconds of each repeat:", {k: [round(t, 2) for t in v] for k, v in times.items()})

    header = f"{'method':<24}{'median s':>9}{'train LL (nats/ex)':>20}{'bits/dim':>10}{'iters':>7}"
    print(header)
    for name, secs, value, iters in (
        ("vaeflow FactorAnalysis", seconds, ll, iterations),
        ("sklearn FactorAnalysis", sk_seconds, sk_ll, reference.n_iter_),
    ):
        bpd = bits(value, x.shape[1], data.log_scale)
        print(f"{name:<24}{secs:>9.2f}{value:>20.4f}{bpd:>10.4f}{iters:>7}")
    print(
        f"speed-up {sk_seconds / seconds:.1f}x, log-likelihood difference "
        f"{ll - sk_ll:+.4f} nats/example (vaeflow - sklearn)"
    )

    # The user's path: the images in an .npy file (in [0, 1], so bits/dim take log 256 here).
    print("\nuser's path: `vaeflow fit` on an .npy with a 2-key YAML against sklearn loading it")
    user: dict[str, list[float]] = {"vaeflow": [], "sklearn": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            seconds, user_ll, sk_seconds = fit_user_path(Path(folder), x.numpy(), args.latent_dim)
            user["vaeflow"].append(seconds)
            user["sklearn"].append(sk_seconds)
    print("seconds of each repeat:", {k: [round(t, 2) for t in v] for k, v in user.items()})
    seconds, sk_seconds = (statistics.median(user[name]) for name in ("vaeflow", "sklearn"))
    print(header)
    for name, secs, value in (
        ("vaeflow fit (CLI, .npy)", seconds, user_ll),
        ("sklearn (np.load + fit)", sk_seconds, sk_ll),
    ):
        print(
            f"{name:<24}{secs:>9.2f}{value:>20.4f}{bits(value, x.shape[1], math.log(256)):>10.4f}"
        )
    print(f"speed-up {sk_seconds / seconds:.1f}x on the user's path")


if __name__ == "__main__":
    main()
