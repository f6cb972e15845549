"""Variational families on MNIST at equal epochs: how much each posterior closes the gap between
the ELBO and log p(x), and what it costs per training step.

Protocol: the IWAE paper's one-stochastic-layer model (Burda et al., 2016; ``configs/
vae_mnist.yaml``): 784-200-200 encoder and 50-200-200-784 decoder (tanh), 50 latent
dimensions, Bernoulli likelihood, MNIST dynamically binarised, Adam (lr 1e-3), batches of 100,
the ELBO with one sample (analytic KL where registered, else Monte Carlo). Every posterior
(``--posteriors``, each with its defaults) trains ``--epochs`` epochs from the same seed; the
test images are MNIST's test set binarised once (the same for every row). Printed per row:
seconds per training step (the wall time from the first training step to the last over the
steps, validation off; data loading left out), the test ELBO,
the test NLL -log p(x) with K = ``--eval-samples`` importance samples, and the gap
log p(x) - ELBO (nats per example) that a richer q(z|x) should shrink. What the paper of each
flow reports is for other models and budgets: compare rows with each other, not with them.

    python benchmarks/posteriors_mnist.py --data-root /tmp/vaeflow_data --epochs 10
    python benchmarks/posteriors_mnist.py --data-root /tmp/vaeflow_data --epochs 1 \\
        --batches-per-epoch 50 --test-examples 500 --eval-samples 100         # a smoke test
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from quiet_fit import quiet_fit_overrides
from torch import Tensor
from torch.utils.data import DataLoader

from vaeflow.cli import VaeflowCLI
from vaeflow.models import VAE

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vae_mnist.yaml"
POSTERIORS = (
    "diagonal_gaussian",
    "diagonal_gaussian:scale=exp",
    "full_gaussian",
    "planar",
    "iaf",
    "iaf:num_flows=4,hidden=[320]",
)


def posterior_overrides(spec: str) -> list[str]:
    """``name`` or ``name:option=value,...`` (a list value in brackets) as CLI overrides."""
    name, _, options = spec.partition(":")
    overrides = [f"--model.init_args.posterior={name}"]
    for option in filter(None, re.split(r",(?![^\[]*\])", options)):
        key, _, value = option.partition("=")
        overrides.append(f"--model.init_args.posterior.init_args.{key}={value}")
    return overrides


class TrainingClock(Callback):
    """Seconds from the first training step to the last: data loading and setup left out."""

    def __init__(self) -> None:
        self.began = self.seconds = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.began = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = time.perf_counter() - self.began


def build(args: argparse.Namespace, posterior: str) -> VaeflowCLI:
    """The config's model with ``posterior``, trained without validation, logging or pictures."""
    overrides = [
        *posterior_overrides(posterior),
        f"--model.init_args.eval_samples={args.eval_samples}",
        f"--data.init_args.root={args.data_root}",
        f"--trainer.max_epochs={args.epochs}",
        *quiet_fit_overrides("posteriors_", validate=False),
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
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on 2 cores shared with other work, 2 threads made a step 6x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    images = None
    for posterior in args.posteriors:
        torch.manual_seed(0)
        cli = build(args, posterior)
        model, data, trainer = cli.model, cli.datamodule, cli.trainer
        if images is None:  # the test images, binarised once, the same for every posterior
            data.setup("test")
            images = torch.cat(list(data.test_dataloader()))[: args.test_examples]
        clock = TrainingClock()
        trainer.callbacks.append(clock)
        trainer.fit(model, data)
        per_step = clock.seconds / max(1, trainer.global_step)
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
    first_step, first_nll = rows[0][2], rows[0][4]
    print(
        f"{'posterior':32s} {'steps':>6s} {'ms/step':>8s} {'x step':>6s} {'test ELBO':>10s} "
        f"{'test NLL':>9s} {'gap':>6s} {'NLL - first':>11s}"
    )
    for posterior, steps, per_step, elbo, nll, gap in rows:
        print(
            f"{posterior:32s} {steps:6d} {1000 * per_step:8.1f} {per_step / first_step:6.2f} "
            f"{elbo:10.2f} {nll:9.2f} {gap:6.2f} {nll - first_nll:11.2f}"
        )


if __name__ == "__main__":
    main()
