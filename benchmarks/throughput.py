"""Throughput on one device: examples per second of the MNIST MLP VAE (vaeflow's fit path and a
hand-written loop, same run), and seconds of factor analysis of MNIST against scikit-learn.

The VAE is ``configs/vae_mnist.yaml``'s model (784-200-200-50, tanh, Bernoulli, fused Adam) on
dynamically binarised MNIST. For each batch size and each ``steps_per_call``:

- **vaeflow**: the config built by ``VaeflowCLI`` and ``trainer.fit`` (Lightning's loop, the
  VAE module, ``MNISTDataModule``'s loader and its per-batch noise, logger, progress bar), with
  validation and checkpointing off (the hand loop does neither). Timed from the step after
  ``--warmup`` to the end of the fit, synchronising the device at both ends.
- **hand**: ``benchmarks/vae_mnist.py``'s hand-written loop (same network and initial weights,
  loss, optimiser factory, batch size), its data and Bernoulli noise on the device.
- **loader**: vaeflow's training loader alone, each batch moved to the device: the ceiling the
  data path puts on vaeflow (its noise is drawn on the host).

Repeats alternate vaeflow and hand; medians are printed. Factor analysis reuses
``benchmarks/fa_mnist.py``'s vaeflow fit (a CPU Lightning fit of the whole EM).

    python benchmarks/throughput.py --device cuda --data-root /tmp/vaeflow_data
    python benchmarks/throughput.py --device cpu --data-root /tmp/vaeflow_data \\
        --steps 20 --warmup 5 --repeats 1 --fa-examples 2000        # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from fa_mnist import alternate_fits, mnist_for_fa
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override
from vae_mnist import CONFIG, HandLoop

from vaeflow.cli import VaeflowCLI


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Seconds and optimiser steps of a fit after its first ``warmup`` steps."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.start: float | None = None
        self.start_step = 0
        self.seconds = 0.0
        self.steps = 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            synchronize(self.device)
            self.start, self.start_step = time.perf_counter(), trainer.global_step

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.start_step


def build(args: argparse.Namespace, batch_size: int, steps_per_call: int, folder: str):
    """The config's model, data module and trainer, as ``vaeflow fit`` builds them."""
    accelerator = "gpu" if args.device.type == "cuda" else "cpu"
    cli = VaeflowCLI(
        args=[
            "--config",
            str(CONFIG),
            "--data.init_args.root",
            args.data_root,
            "--data.init_args.batch_size",
            str(batch_size),
            "--model.init_args.steps_per_call",
            str(steps_per_call),
            "--trainer.accelerator",
            accelerator,
            "--trainer.devices",
            "1",
            "--trainer.max_epochs",
            "-1",
            "--trainer.max_steps",
            str(args.warmup + args.steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            folder,
            "--trainer.logger.init_args.save_dir",
            folder,
            *args.overrides,
        ],
        run=False,
    )
    return cli.model, cli.datamodule, cli.trainer


def vaeflow_rate(args: argparse.Namespace, batch_size: int, steps_per_call: int) -> float:
    """Examples per second of ``trainer.fit`` on the config after the warm-up steps."""
    with tempfile.TemporaryDirectory() as folder:
        model, data, trainer = build(args, batch_size, steps_per_call, folder)
        timer = StepTimer(args.warmup, args.device)
        trainer.callbacks.insert(0, timer)
        trainer.fit(model, data)
    return timer.steps * batch_size / timer.seconds


def hand_rate(args: argparse.Namespace, batch_size: int) -> float:
    """Examples per second of the hand-written loop, data and noise on the device."""
    with tempfile.TemporaryDirectory() as folder:
        model, data, _ = build(args, batch_size, 1, folder)
    data.setup("fit")
    with torch.device(args.device):  # the loop's parameters, orders and noise live there
        hand = HandLoop(model, data.splits["train"].to(args.device), batch_size)
        hand.steps(args.warmup)
        synchronize(args.device)
        start = time.perf_counter()
        hand.steps(args.steps)
        synchronize(args.device)
    return args.steps * batch_size / (time.perf_counter() - start)


def loader_rate(args: argparse.Namespace, batch_size: int) -> float:
    """Examples per second of vaeflow's training loader alone, batches moved to the device."""
    with tempfile.TemporaryDirectory() as folder:
        _, data, _ = build(args, batch_size, 1, folder)
    data.setup("fit")
    examples, start = 0, time.perf_counter()
    while examples < (args.warmup + args.steps) * batch_size:
        for batch in data.train_dataloader():
            batch = batch.to(args.device, non_blocking=True)
            examples += len(batch)
    synchronize(args.device)
    return examples / (time.perf_counter() - start)


def vae_table(args: argparse.Namespace) -> None:
    print(
        f"\nVAE ({CONFIG.name}'s model), {args.steps} timed steps after {args.warmup}, "
        f"median of {args.repeats}, examples/s:"
    )
    header = f"{'batch':>6} {'loader':>11} {'hand':>11}"
    header += "".join(f" {f'vaeflow k={k}':>15} {'ratio':>6}" for k in args.steps_per_call)
    print(header)
    for batch_size in args.batch_sizes:
        rates: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternate, so that drifts in load fall on all
            rates.setdefault("hand", []).append(hand_rate(args, batch_size))
            for k in args.steps_per_call:
                rates.setdefault(k, []).append(vaeflow_rate(args, batch_size, k))
        median = {name: statistics.median(values) for name, values in rates.items()}
        row = f"{batch_size:>6} {loader_rate(args, batch_size):>11,.0f} {median['hand']:>11,.0f}"
        for k in args.steps_per_call:  # ratio: time per example, vaeflow over hand
            row += f" {median[k]:>15,.0f} {median['hand'] / median[k]:>6.3f}"
        print(row, flush=True)


def fa_table(args: argparse.Namespace) -> None:
    """Factor analysis of MNIST (as ``benchmarks/fa_mnist.py``): fit seconds and the exact mean
    training log-likelihood of vaeflow and scikit-learn."""
    data = mnist_for_fa(args.data_root)
    if args.fa_examples:
        data.splits["train"] = data.splits["train"][: args.fa_examples]
    x = data.splits["train"]
    seconds, sk_seconds, model, reference, _ = alternate_fits(data, args.latent_dim, args.repeats)
    ll, sk_ll = model.log_likelihood(x).mean().item(), reference.score(x.double().numpy())
    print(
        f"\nfactor analysis of MNIST: {tuple(x.shape)}, M = {args.latent_dim}, median of "
        f"{args.repeats} (vaeflow: fa_mnist.fit_vaeflow, a CPU Lightning fit)"
    )
    print(f"{'method':<24}{'seconds':>9}{'train LL (nats/ex)':>20}")
    print(f"{'vaeflow FactorAnalysis':<24}{seconds:>9.3f}{ll:>20.4f}")
    print(f"{'sklearn FactorAnalysis':<24}{sk_seconds:>9.3f}{sk_ll:>20.4f}")
    print(f"speed-up {sk_seconds / seconds:.1f}x (target: vaeflow under 1 s on a GPU machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--steps-per-call", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=200, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-dim", type=int, default=32, help="factors of the FA")
    parser.add_argument("--fa-examples", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--skip-fa", action="store_true")
    parser.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        default="highest",
        help="torch.set_float32_matmul_precision for both loops (high: TF32 on a GPU)",
    )
    parser.add_argument("overrides", nargs="*", help="more vaeflow CLI arguments after --")
    args = parser.parse_args()
    sys.argv[1:] = []  # LightningCLI would read this script's arguments as its own
    torch.set_float32_matmul_precision(args.matmul_precision)
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(
        f"device {args.device} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, matmul precision {args.matmul_precision}"
    )
    if not args.skip_vae:
        vae_table(args)
    if not args.skip_fa:
        fa_table(args)


if __name__ == "__main__":
    main()
