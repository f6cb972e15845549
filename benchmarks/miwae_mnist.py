"""MIWAE on MNIST with half of the pixels missing: how well are the missing pixels imputed?

Protocol (Mattei & Frellsen, 2019, on MNIST): the grey-level MNIST images scaled to [0, 1], and
in each of them 50% of the pixels removed completely at random (``--seed``), in the 60,000
training images and in the 10,000 held-out test images alike. Three imputations of the test
images' missing pixels, scored by the RMSE against the true pixels:

- **MIWAE**: ``VAE(missing="zeros", estimator="importance_weighted", num_samples=K)`` trained on
  the incomplete images (NaN) through ``ArrayDataModule``, the product path; the encoder sees 0
  in place of each missing pixel, the Bernoulli likelihood counts the observed pixels only.
  Imputation: :meth:`VAE.impute`, E[x_miss | x_obs] by self-normalised importance sampling.
- **VAE on zero-filled images**: the same networks trained on the ELBO of the images with each
  missing pixel set to 0 and taken as observed (the paper's zero-imputation baseline).
  Imputation: its reconstruction E[x | z = E_q[z | x]] at the missing pixels.
- **Mean imputation**: each pixel's mean over the training images that observe it.

Both VAEs: MLPs 784-200-200 (tanh), 20 latent dimensions, Adam 1e-3, batches of 100, the same
``--epochs``, validation off.

    python benchmarks/miwae_mnist.py --data-root /tmp/vaeflow_data --epochs 10 --impute-samples 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer

from vaeflow.data import ArrayDataModule, MNISTDataModule
from vaeflow.models import VAE

NETS = "mlp"  # 784-200-200 (tanh), the registered default


def incomplete_mnist(root: str, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """MNIST's training and test images in [0, 1] (float32, flat), and each with ``fraction``
    of its pixels set to NaN completely at random."""
    data = MNISTDataModule(root=root, val_fraction=0.0)
    data.prepare_data()
    data.setup()
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        complete = data.splits[split].numpy().astype(np.float32)
        missing = rng.random(complete.shape) < fraction
        arrays[split] = complete
        arrays[f"{split}_incomplete"] = np.where(missing, np.float32(np.nan), complete)
    return arrays


def train(model: VAE, train: np.ndarray, folder: Path, epochs: int, name: str) -> float:
    """Fit ``model`` on ``train`` (saved as an ``.npy`` file, read by ``ArrayDataModule``) for
    ``epochs`` epochs; seconds per epoch."""
    path = folder / f"{name}.npy"
    np.save(path, train)
    data = ArrayDataModule(str(path), scale=False, val_fraction=0.0, batch_size=100)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[],
        default_root_dir=str(folder),
    )
    began = time.perf_counter()
    trainer.fit(model, data)
    return (time.perf_counter() - began) / epochs


def rmse(imputed: np.ndarray, truth: np.ndarray, missing: np.ndarray) -> float:
    """Root mean squared error over the missing pixels."""
    return float(np.sqrt(np.mean((imputed[missing] - truth[missing]) ** 2)))


def in_batches(
    function: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, size: int = 500
) -> np.ndarray:
    """``function`` over ``x`` in batches of ``size`` examples, without gradients."""
    with torch.no_grad():
        return np.concatenate(
            [function(torch.from_numpy(x[i : i + size])).numpy() for i in range(0, len(x), size)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="a folder holding MNIST/raw/*.gz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5, help="K of MIWAE's training bound")
    parser.add_argument("--impute-samples", type=int, default=100)
    parser.add_argument(
        "--train-examples", type=int, default=None, help="the first N training images only"
    )
    parser.add_argument("--fraction", type=float, default=0.5, help="share of pixels missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on 2 busy cores spin: 10x slower)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
        "(shared machine)"
    )
    arrays = incomplete_mnist(args.data_root, args.fraction, args.seed)
    for split in ("train", "train_incomplete"):
        arrays[split] = arrays[split][: args.train_examples]
    truth, test = arrays["test"], arrays["test_incomplete"]
    missing = np.isnan(test)
    print(
        f"MNIST, {args.fraction:.0%} of pixels missing completely at random (seed {args.seed}): "
        f"{len(arrays['train'])} training and {len(test)} test images; {missing.mean():.4f} of "
        "the test pixels missing"
    )
    common = dict(latent_dim=20, likelihood="bernoulli", encoder=NETS, decoder=NETS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="miwae_mnist_") as tmp:
        folder = Path(tmp)

        torch.manual_seed(args.seed)
        miwae = VAE(
            (784,),
            estimator="importance_weighted",
            num_samples=args.samples,
            missing="zeros",
            **common,
        )
        seconds = train(miwae, arrays["train_incomplete"], folder, args.epochs, "incomplete")
        print(f"MIWAE (K = {args.samples}): {args.epochs} epochs, {seconds:.1f} s per epoch")
        began = time.perf_counter()
        miwae.eval()
        imputed = in_batches(lambda x: miwae.impute(x, args.impute_samples), test)
        print(f"  imputation, K = {args.impute_samples}: {time.perf_counter() - began:.1f} s")
        results[f"MIWAE (K = {args.samples}), importance-weighted imputation"] = imputed

        torch.manual_seed(args.seed)
        zero_filled = VAE((784,), **common)
        filled = np.nan_to_num(arrays["train_incomplete"], nan=0.0)
        seconds = train(zero_filled, filled, folder, args.epochs, "zero_filled")
        print(f"VAE on zero-filled images: {args.epochs} epochs, {seconds:.1f} s per epoch")
        zero_filled.eval()

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            return zero_filled.decode(zero_filled.encode(x).mean).mean

        imputed = in_batches(reconstruct, np.nan_to_num(test, nan=0.0))
        results["VAE trained on zero-filled images, reconstruction"] = imputed

    means = np.nanmean(arrays["train_incomplete"], axis=0)
    results["mean imputation (per-pixel mean of the observed training values)"] = np.broadcast_to(
        means, test.shape
    )
    print(f"\nRMSE of the {int(missing.sum())} missing test pixels (grey levels in [0, 1]):")
    for name, imputed in results.items():
        print(f"  {rmse(imputed, truth, missing):.4f}  {name}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
