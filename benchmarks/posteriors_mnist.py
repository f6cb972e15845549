"""Variational families on MNIST at equal epochs: how much each posterior closes the gap between
the ELBO and log p(x), and what it costs per training step.

Protocol: the IWAE paper's one-stochastic-layer model (Burda et al., 2016; ``configs/
vae_mnist.yaml``): 784-200-200 encoder and 50-200-200-784 decoder (tanh), 50 latent
dimensions, Bernoulli likelihood, MNIST dynamically binarised, Adam (lr 1e-3), batches of 100,
the ELBO with one sample (analytic KL where registered, else Monte Carlo). Every posterior
(``--posteriors``, each with its defaults) trains ``--epochs`` epochs from the same seed; the
test images are MNIST's test set binarised once (the same for every row). Printed per row:
seconds per training step (the fit's wall time over its steps, validation off), the test ELBO,
the test NLL -log p(x) with K = ``--eval-samples`` importance samples, and the gap
log p(x) - ELBO (nats per example) that a richer q(z|x) should shrink. What the paper of each
flow reports is for other models and budgets: compare rows with each other, not with them.

    python benchmarks/posteriors_mnist.py --data-root /tmp/vaeflow_data --epochs 10
    python benchmarks/posteriors_mnist.py --data-root /tmp/vaeflow_data --epochs 1 \\
        --batches-per-epoch 50 --test-examples 500 --eval-samples 100         # a smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from vaeflow.cli import VaeflowCLI
from vaeflow.models import VAE

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vae_mnist.yaml"
POSTERIORS = ("diagonal_gaussian", "full_gaussian", "planar", "iaf")


def build(args: argparse.Namespace, posterior: str) -> VaeflowCLI:
    """The config's model with ``posterior``, trained without validation, logging or pictures."""
    overrides = [
        f"--model.init_args.posterior={posterior}",
        f"--model.init_args.eval_samples={args.eval_samples}",
        f"--data.init_args.root={args.data_root}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        # a fresh folder per model: the CLI keeps each run's config and never overwrites one
        f"--trainer.default_root_dir={tempfile.mkdtemp(prefix=f'posteriors_{posterior}_')}",
    ]
    if args.batches_per_epoch:
        overrides.append(f"--trainer.limit_train_batches={args.batches_per_epoch}")
    return VaeflowCLI(args=["--config", str(CONFIG), *overrides], run=False)


def evaluate(model: VAE, images: Tensor, batch_size: int) -> tuple[float, float, float]:
    """(test ELBO, test log p(x), seconds) by ``Trainer.test``, what ``vaeflow test`` runs."""
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    began = time.perf_counter()
    metrics = trainer.test(model, DataLoader(images, batch_size), verbose=False)[0]
    seconds = time.perf_counter() - began
    return float(metrics["test/elbo"]), float(metrics["test/log_likelihood"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS))
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of every model")
    parser.add_argument("--batches-per-epoch", type=int, default=0, help="0: all")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K of the test NLL")
    parser.add_argument("--test-examples", type=int, default=10_000, help="test images used")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    args = parser.parse_args()

    rows = []
    images = None
    for posterior in args.posteriors:
        torch.manual_seed(0)
        cli = build(args, posterior)
        model, data, trainer = cli.model, cli.datamodule, cli.trainer
        if images is None:  # the test images, binarised once, the same for every posterior
            data.setup("test")
            images = torch.cat(list(data.test_dataloader()))[: args.test_examples]
        began = time.perf_counter()
        trainer.fit(model, data)
        per_step = (time.perf_counter() - began) / max(1, trainer.global_step)
        elbo, log_px, eval_seconds = evaluate(model, images, args.eval_batch_size)
        rows.append((posterior, trainer.global_step, per_step, elbo, -log_px, log_px - elbo))
        print(
            f"{posterior}: {trainer.global_step} steps, {1000 * per_step:.1f} ms/step, test ELBO "
            f"{elbo:.2f}, NLL {-log_px:.2f} ({eval_seconds:.0f} s)",
            flush=True,
        )

    batches = args.batches_per_epoch or "all"
    print(
        f"\nposteriors_mnist: {args.epochs} epochs ({batches} batches of {data.batch_size} per "
        f"epoch), test NLL with K = {args.eval_samples} on {len(images)} test images, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'posterior':18s} {'steps':>6s} {'ms/step':>8s} {'test ELBO':>10s} {'test NLL':>9s} "
        f"{'gap':>6s}"
    )
    for posterior, steps, per_step, elbo, nll, gap in rows:
        print(
            f"{posterior:18s} {steps:6d} {1000 * per_step:8.1f} {elbo:10.2f} {nll:9.2f} {gap:6.2f}"
        )


if __name__ == "__main__":
    main()
