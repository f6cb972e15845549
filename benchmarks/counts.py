"""Count likelihoods on synthetic counts of a known negative-binomial latent model: test
log-likelihood of the counts and seconds per epoch, vaeflow's VAEs beside scvi-tools' SCVI.

The data: z ~ N(0, I_2) per example, mean mu = depth * softmax(W z + b) over the genes,
x_g ~ NB(mu_g, theta_g) (Gamma-Poisson). Its true log-likelihood log p(x) is an integral over
two dimensions, taken by the trapezoid rule on a grid (its error is printed: the same grid at
twice the spacing). Every model has latent_dim 2 and one hidden layer of 128 units, is trained
for the same epochs with Adam (lr 1e-3, batch 128) on the same training counts, and is scored
on the same test counts by the importance-weighted estimate with ``--samples`` samples (nats
per example, summed over genes):

- vaeflow ``negative_binomial``, ``zero_inflated_negative_binomial`` and ``poisson`` VAEs
  (log link, ``library_size: none``: depth is part of what the latent code explains, as in the
  data), and a ``gaussian`` VAE (learned variance per gene) on y = log(1 + x + u), x
  dequantised by u ~ U[0, 1) once. Its score is of the counts: by the change of variables
  p_X(x + u) = p_Y(log(1 + x + u)) / (1 + x + u), and the mass of the count k, the integral over
  u of the density at k + u, is at least exp E_u[log p_X(k + u)] (Jensen), which is estimated
  with ``--dequantizations`` draws of u: a lower bound on its log-mass of the counts.
- scvi-tools ``SCVI`` (``gene_likelihood`` nb and zinb, ``dispersion="gene"``,
  ``use_observed_lib_size=False`` so that its library size is a latent variable and
  ``get_marginal_ll`` estimates log p(x), the quantity the others give), trained in a separate
  Python environment (``--scvi-python``; scvi-tools pins its own torch and Lightning) by this
  same script in ``--scvi-worker`` mode, in the same run.

    .venv/bin/python benchmarks/counts.py --scvi-python /tmp/scvi_venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN = 128
LATENT = 2
BATCH = 128
LEARNING_RATE = 1e-3


def simulate(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Counts of the known model, its parameters, and the train/test split."""
    rng = np.random.default_rng(args.seed)
    weights = rng.normal(0.0, 0.8, (LATENT, args.genes))
    offsets = rng.normal(0.0, 1.0, args.genes)
    theta = np.exp(rng.uniform(np.log(0.5), np.log(5.0), args.genes))
    z = rng.normal(size=(args.train + args.test, LATENT))
    mean = args.depth * softmax(z @ weights + offsets)
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    return {
        "train": counts[: args.train],
        "test": counts[args.train :],
        "weights": weights,
        "offsets": offsets,
        "theta": theta,
        "depth": np.array(args.depth),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def true_log_likelihood(data: dict[str, np.ndarray], spacing: float, bound: float = 6.0) -> float:
    """Mean log p(x) of the test counts under the true model, by the trapezoid rule on a square
    grid of ``spacing`` over [-bound, bound]^2 (the prior's mass outside is below 1e-8).

    log NB(x | z) = c(x) + B(z) + x . A(z) with A_g = log(mu_g / (theta_g + mu_g)) and B =
    sum_g theta_g log(theta_g / (theta_g + mu_g)): one matrix product per chunk of grid points.
    """
    from scipy.special import gammaln, logsumexp

    axis = np.arange(-bound, bound + spacing / 2, spacing)
    trapezoid = np.full(len(axis), spacing)
    trapezoid[[0, -1]] /= 2
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, LATENT)
    log_weight = (np.log(trapezoid)[:, None] + np.log(trapezoid)[None]).reshape(-1)
    log_prior = -0.5 * (grid**2).sum(-1) - math.log(2 * math.pi)
    x, theta = data["test"].astype(np.float64), data["theta"]
    constant = (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)).sum(-1)
    total = np.full(len(x), -np.inf)
    for start in range(0, len(grid), 8192):
        points = grid[start : start + 8192]
        mean = data["depth"] * softmax(points @ data["weights"] + data["offsets"])
        log_total = np.log(theta + mean)
        a = np.log(mean) - log_total
        b = (theta * (np.log(theta) - log_total)).sum(-1)
        terms = x @ a.T + b + log_prior[start : start + 8192] + log_weight[start : start + 8192]
        total = np.logaddexp(total, logsumexp(terms, axis=1))
    return float((total + constant).mean())


def train_vaeflow(likelihood, x, epochs: int):
    """A VAE of the benchmark's size trained on ``x``; returns it and seconds per epoch."""
    import functools

    import torch
    from lightning.pytorch import Trainer

    from vaeflow.models import VAE
    from vaeflow.nets import MLP

    torch.manual_seed(0)
    net = functools.partial(MLP, hidden=(HIDDEN,), activation="ReLU")
    model = VAE(
        (x.shape[1],),
        latent_dim=LATENT,
        likelihood=likelihood,
        encoder=net,
        decoder=net,
        optimizer=functools.partial(torch.optim.Adam, lr=LEARNING_RATE),
    )
    loader = torch.utils.data.DataLoader(torch.from_numpy(x), batch_size=BATCH, shuffle=True)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model.eval(), (time.perf_counter() - start) / epochs


def vaeflow_rows(data: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict]:
    """vaeflow's count VAEs and the Gaussian on log1p counts, scored on the test counts."""
    import torch

    from vaeflow.likelihoods import GaussianLikelihood
    from vaeflow.registry import LIKELIHOODS

    rows = []
    test = torch.from_numpy(data["test"])
    for name in ("negative_binomial", "zero_inflated_negative_binomial", "poisson"):
        model, seconds = train_vaeflow(LIKELIHOODS.build(name), data["train"], args.epochs)
        torch.manual_seed(1)
        score = model.log_likelihood(test, args.samples).mean().item()
        rows.append({"model": f"vaeflow {name}", "test_ll": score, "seconds_per_epoch": seconds})
        print(rows[-1], flush=True)  # a long run shows its progress
    rng = np.random.default_rng(args.seed + 1)
    shifted = data["train"] + rng.random(data["train"].shape, dtype=np.float32)
    model, seconds = train_vaeflow(
        GaussianLikelihood("per_dimension"), np.log1p(shifted), args.epochs
    )
    bounds = []
    torch.manual_seed(1)
    for _ in range(args.dequantizations):
        shifted = test + torch.from_numpy(rng.random(test.shape, dtype=np.float32))
        log_density = model.log_likelihood(shifted.log1p(), args.samples)
        bounds.append(log_density - shifted.log1p().sum(-1))  # the Jacobian of y = log(1 + x)
    rows.append(
        {
            "model": "vaeflow gaussian on log1p (lower bound)",
            "test_ll": torch.stack(bounds).mean().item(),
            "seconds_per_epoch": seconds,
        }
    )
    return rows


def scvi_worker(path: str, epochs: int, samples: int) -> None:
    """Run in scvi-tools' environment: train SCVI (nb, zinb) and print one JSON line each."""
    import anndata
    import scvi

    scvi.settings.seed = 0
    arrays = np.load(path)
    train, test = anndata.AnnData(arrays["train"]), anndata.AnnData(arrays["test"])
    scvi.model.SCVI.setup_anndata(train)
    for likelihood in ("nb", "zinb"):
        model = scvi.model.SCVI(
            train,
            n_hidden=HIDDEN,
            n_latent=LATENT,
            n_layers=1,
            gene_likelihood=likelihood,
            dispersion="gene",
            use_observed_lib_size=False,
        )
        start = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=BATCH,
            train_size=1.0,
            early_stopping=False,
            accelerator="cpu",
            enable_progress_bar=False,
            plan_kwargs={"lr": LEARNING_RATE},
        )
        seconds = (time.perf_counter() - start) / epochs
        score = float(model.get_marginal_ll(test, n_mc_samples=samples))
        row = {"model": f"scvi-tools SCVI {likelihood}", "test_ll": score}
        print(json.dumps(row | {"seconds_per_epoch": seconds}), flush=True)


def scvi_rows(data: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict]:
    """SCVI's rows from the worker in scvi-tools' environment, or none with the reason."""
    if not args.scvi_python:
        print("scvi-tools: skipped (no --scvi-python given)")
        return []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "counts.npz"
        np.savez(path, train=data["train"], test=data["test"])
        command = [args.scvi_python, __file__, "--scvi-worker", str(path)]
        command += ["--epochs", str(args.epochs), "--samples", str(args.samples)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"scvi-tools worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return []
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--depth", type=float, default=200.0, help="expected counts per example")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--samples", type=int, default=1000, help="importance samples")
    parser.add_argument("--dequantizations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scvi-python", help="python of an environment with scvi-tools")
    parser.add_argument("--scvi-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scvi_worker:
        scvi_worker(args.scvi_worker, args.epochs, args.samples)
        return
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # per-fit banners
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machine)"
    )
    data = simulate(args)
    zeros = float((data["train"] == 0).mean())
    print(
        f"{args.train} training and {args.test} test examples of {args.genes} genes, mean "
        f"{data['train'].mean():.2f} counts per gene, {zeros:.0%} zeros; {args.epochs} epochs"
    )
    fine, coarse = (true_log_likelihood(data, s) for s in (0.025, 0.05))
    print(f"true model: test log-likelihood {fine:.3f} (grid spacing 0.05 gives {coarse:.3f})")
    rows = vaeflow_rows(data, args) + scvi_rows(data, args)
    print(f"\n{'model':42s} {'test log p(x)':>14s} {'gap to truth':>13s} {'s/epoch':>8s}")
    for row in rows:
        gap = row["test_ll"] - fine
        print(
            f"{row['model']:42s} {row['test_ll']:14.3f} {gap:13.3f} {row['seconds_per_epoch']:8.3f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
