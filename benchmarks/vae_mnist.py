"""Seconds per training epoch: vaeflow (``configs/vae_mnist.yaml``) against a hand-written loop.

Both run in one process, interleaved in chunks of a few steps: inside vaeflow's ``trainer.fit``
a callback runs, after every ``--chunk`` vaeflow steps, the same number of steps of the
hand-written loop, so that load from other processes hits both alike. The hand loop is the same
network with the same initial weights, loss (Bernoulli BCE summed over pixels, analytic KL, one
sample of z), optimiser (built by the config's own optimiser factory), batch size, dynamic
binarisation per batch, in-memory training tensor and torch thread count.

What is timed: for vaeflow, each training step from one ``on_train_batch_end`` to the next (the
first from ``on_train_epoch_start``): Lightning's loop, data fetching, the step, backward,
optimiser, logging and progress bar. Validation, checkpointing and epoch-end logging come after
the last step; they are reported apart. For the hand loop, its steps, shuffling included.
Epoch 0 is warm-up. The ratio is the median over chunks of vaeflow's chunk time over the hand
loop's chunk right after it: each pair runs the same steps under the same load, so drifts in the
machine's speed (other processes on a shared machine) cancel. Median ms/step of each and the
summed epoch times are printed beside it.

    python benchmarks/vae_mnist.py --data-root /tmp/vaeflow_data --epochs 3
    python benchmarks/vae_mnist.py --data-root /tmp/vaeflow_data -- --trainer.max_time=00:00:10:00
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from vaeflow.cli import VaeflowCLI
from vaeflow.models import VAE
from vaeflow.steps_per_call import fitting

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vae_mnist.yaml"


class HandVAE(nn.Module):
    """The config's network written out: 784-200-200-(2x50) encoder, 50-200-200-784 decoder."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.latent_dim = model.latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 100)
        )
        self.decoder = nn.Sequential(
            nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 784)
        )
        # Same initial weights as vaeflow's model, so that the two ELBOs are comparable.
        self.encoder.load_state_dict(model.encoder.layers.state_dict())
        self.decoder.load_state_dict(model.decoder.layers.state_dict())

    def elbo(self, x: Tensor) -> Tensor:
        """Per-example ELBO with one reparameterised sample and the analytic Gaussian KL."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + 1e-6
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        reconstruction = -nn.functional.binary_cross_entropy_with_logits(
            logits, x, reduction="none"
        ).sum(-1)
        kl = 0.5 * (loc.square() + scale.square() - 1.0).sum(-1) - scale.log().sum(-1)
        return reconstruction - kl


class HandLoop:
    """A plain PyTorch training loop over the same in-memory tensor as vaeflow's data module."""

    def __init__(self, model: VAE, data: Tensor, batch_size: int) -> None:
        self.net = HandVAE(model)
        self.optimizer = model.optimizer(self.net.parameters())
        self.data = data
        self.batch_size = batch_size
        self.elbo = float("nan")
        self._order = torch.randperm(len(data))
        self._begin = len(data)
        self._total = torch.zeros(())
        self._steps = 0

    def steps(self, count: int) -> None:
        """``count`` training steps; a new epoch (a new shuffle) starts where the last ended."""
        with torch.enable_grad():
            for _ in range(count):
                if self._begin >= len(self.data):
                    self._start_epoch()
                index = self._order[self._begin : self._begin + self.batch_size]
                self._begin += self.batch_size
                x = torch.bernoulli(self.data[index])
                elbo = self.net.elbo(x).mean()
                self.optimizer.zero_grad(set_to_none=True)
                (-elbo).backward()
                self.optimizer.step()
                self._total += elbo.detach()
                self._steps += 1

    def _start_epoch(self) -> None:
        if self._steps:
            self.elbo = (self._total / self._steps).item()  # the finished epoch's mean ELBO
        self._order = torch.randperm(len(self.data))
        self._begin = 0
        self._total = torch.zeros(())
        self._steps = 0

    def finish(self) -> None:
        """Record the mean training ELBO (nats per example) of the epoch in progress."""
        self._start_epoch()


class Interleave(Callback):
    """Times vaeflow's training steps, and runs the hand loop in chunks between them."""

    def __init__(self, hand: HandLoop, chunk: int) -> None:
        self.hand = hand
        self.chunk = chunk
        #: per epoch, the seconds of each chunk of steps: vaeflow's and the hand loop's.
        self.vaeflow_chunks: list[list[float]] = []
        self.hand_chunks: list[list[float]] = []
        #: per epoch, the steps of each chunk (the same for both).
        self.chunk_steps: list[list[int]] = []
        #: per epoch, seconds from the end of the last step to ``on_train_epoch_end``.
        self.untimed: list[float] = []
        self._last = 0.0
        self._elapsed = 0.0
        self._pending = 0
        self._done = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.vaeflow_chunks.append([])
        self.hand_chunks.append([])
        self.chunk_steps.append([])
        self._elapsed, self._pending, self._done = 0.0, 0, 0
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._elapsed += now - self._last
        # with steps_per_call > 1 a call takes several steps; batch_idx is the last one's
        self._pending += batch_idx + 1 - self._done
        self._done = batch_idx + 1
        if self._pending >= self.chunk or self._done == trainer.num_training_batches:
            self.vaeflow_chunks[-1].append(self._elapsed)
            self.chunk_steps[-1].append(self._pending)
            start = time.perf_counter()
            self.hand.steps(self._pending)
            self.hand_chunks[-1].append(time.perf_counter() - start)
            self._elapsed, self._pending = 0.0, 0
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.untimed.append(time.perf_counter() - self._last)
        self.hand.finish()


def after_warm_up(per_epoch: list[list[float]]) -> list[float]:
    """The values of epochs 1.. (all of them when there is one epoch)."""
    return [value for epoch in (per_epoch[1:] or per_epoch) for value in epoch]


def summarise(timer: Interleave) -> tuple[float, float, float]:
    """Median ms per step of vaeflow and of the hand loop, and the median paired ratio."""
    steps = after_warm_up(timer.chunk_steps)
    vaeflow = after_warm_up(timer.vaeflow_chunks)
    hand = after_warm_up(timer.hand_chunks)
    return (
        statistics.median(1e3 * s / n for s, n in zip(vaeflow, steps, strict=True)),
        statistics.median(1e3 * s / n for s, n in zip(hand, steps, strict=True)),
        statistics.median(v / h for v, h in zip(vaeflow, hand, strict=True)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each; 0 is warm-up")
    parser.add_argument("--chunk", type=int, default=20, help="steps of each between switches")
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument(
        "overrides",
        nargs="*",
        help="more vaeflow CLI arguments after --, e.g. -- --trainer.limit_train_batches=200",
    )
    args = parser.parse_args()

    cli = VaeflowCLI(
        args=[
            "--config",
            args.config,
            "--data.init_args.root",
            args.data_root,
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.default_root_dir",
            "runs/benchmark",
            "--trainer.logger.init_args.save_dir",
            "runs/benchmark",
            *args.overrides,
        ],
        run=False,
    )
    datamodule, model, trainer = cli.datamodule, cli.model, cli.trainer
    datamodule.setup("fit")
    hand = HandLoop(model, datamodule.splits["train"], datamodule.batch_size)
    timer = Interleave(hand, args.chunk)
    trainer.callbacks.insert(0, timer)
    with fitting(model):  # as `vaeflow fit` runs it
        trainer.fit(model, datamodule)

    steps = trainer.num_training_batches
    vaeflow_ms, hand_ms, ratio = summarise(timer)
    print(
        f"\nvae_mnist: {len(datamodule.splits['train'])} training examples, batch "
        f"{datamodule.batch_size}, {steps} steps/epoch, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, optimiser {type(hand.optimizer).__name__}("
        f"{ {k: v for k, v in hand.optimizer.defaults.items() if v not in (None, False, 0.0)} })"
    )
    print(
        f"timed: training steps only, interleaved in chunks of {args.chunk} steps; vaeflow with "
        f"steps_per_call={model.steps_per_call}, "
        f"{type(trainer.progress_bar_callback).__name__}, its logger and checkpointing on "
        f"(validation and checkpointing happen outside the timed steps)"
    )
    for name, chunks in (("vaeflow", timer.vaeflow_chunks), ("hand", timer.hand_chunks)):
        print(f"  summed s per epoch, {name + ':':8s} {[round(sum(e), 3) for e in chunks]}")
    print(
        "epochs 1.. (epoch 0 is warm-up), median ms per step, as s per epoch:\n"
        f"vaeflow  {vaeflow_ms * steps / 1e3:7.3f} s/epoch ({vaeflow_ms:.3f} ms/step)   final "
        f"train ELBO {float(trainer.callback_metrics['train/elbo']):8.2f} nats\n"
        f"hand     {hand_ms * steps / 1e3:7.3f} s/epoch ({hand_ms:.3f} ms/step)   final "
        f"train ELBO {hand.elbo:8.2f} nats"
    )
    print(f"ratio vaeflow/hand {ratio:.3f}, median of paired chunks (target <= 1.10)")
    print(
        "vaeflow untimed per epoch (validation, checkpoint, epoch-end logging): "
        f"{statistics.mean(timer.untimed):.3f} s"
    )


if __name__ == "__main__":
    main()
