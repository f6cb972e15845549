"""The importance-weighted test log-likelihood: ``vaeflow test`` against a hand-written batched
PyTorch evaluation of the same model on the same images, in one run.

The model is ``configs/vae_mnist.yaml``'s (784-200-200-50, tanh, Bernoulli), untrained or from
``--checkpoint``; the images are MNIST's test set with its fixed dynamic binarisation. vaeflow's
side is ``Trainer.test`` (what ``vaeflow test`` runs: the importance-weighted estimate with
K = ``--samples``, plus the ELBO, its parts, active units and the per-dimension KL); the hand
side is :func:`hand_log_likelihood`, the estimate written out in plain torch (encode once, the
samples through the decoder in chunks, a running log-sum-exp). Both see batches of
``--batch-size`` examples and chunks of the same number of samples, and run ``--repeats`` times
alternately so that load from other processes falls on both; the median seconds, the estimate
(nats per example) and the peak resident memory are printed. Target: vaeflow's time at most the
hand-written one's.

    python benchmarks/vae_eval.py --data-root /tmp/vaeflow_data                # K=5000, 10,000
    python benchmarks/vae_eval.py --data-root /tmp/vaeflow_data --samples 100 --examples 500
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vaeflow.cli import VaeflowCLI
from vaeflow.models import VAE
from vaeflow.models.vae import samples_per_chunk

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "vae_mnist.yaml"
LOG_2PI = math.log(2 * math.pi)


def hand_network(model: VAE) -> tuple[nn.Module, nn.Module]:
    """The model's encoder and decoder as plain ``nn.Sequential`` stacks, same weights."""
    return model.encoder.layers, model.decoder.layers


def hand_log_likelihood(
    encoder: nn.Module, decoder: nn.Module, x: Tensor, samples: int, chunk: int
) -> Tensor:
    """log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) per example, z_k ~ q(z|x), K = ``samples``,
    for a diagonal Gaussian q, a standard-normal prior and a Bernoulli decoder."""
    with torch.no_grad():
        loc, raw_scale = encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + 1e-6
        latent = loc.shape[-1]
        total = None
        for start in range(0, samples, chunk):
            eps = torch.randn(min(chunk, samples - start), *loc.shape)
            z = loc + scale * eps
            logits = decoder(z)
            log_px = -F.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none"
            ).sum(-1)
            log_pz = -0.5 * z.square().sum(-1) - 0.5 * latent * LOG_2PI
            log_qz = -0.5 * eps.square().sum(-1) - scale.log().sum(-1) - 0.5 * latent * LOG_2PI
            part = (log_px + log_pz - log_qz).logsumexp(0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(samples)


def peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args: argparse.Namespace) -> tuple[VAE, Tensor]:
    """The model (config or checkpoint) and the test images, binarised once."""
    cli = VaeflowCLI(
        args=[
            "--config",
            str(CONFIG),
            "--data.init_args.root",
            args.data_root,
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
        ],
        run=False,
    )
    model = VAE.load_from_checkpoint(args.checkpoint) if args.checkpoint else cli.model
    data = cli.datamodule
    data.setup("test")
    images = torch.cat(list(data.test_dataloader()))[: args.examples]
    return model.eval(), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--checkpoint", default=None, help="a trained VAE (else untrained)")
    parser.add_argument("--samples", type=int, default=5000, help="importance samples K")
    parser.add_argument("--examples", type=int, default=10_000, help="test images")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per batch")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    model, images = build(args)
    model.eval_samples = args.samples
    chunk = samples_per_chunk(args.batch_size, model.likelihood.num_outputs, images.device)
    encoder, decoder = hand_network(model)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    times: dict[str, list[float]] = {"vaeflow": [], "hand": []}
    results: dict[str, float] = {}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = trainer.test(model, DataLoader(images, args.batch_size), verbose=False)[0]
        times["vaeflow"].append(time.perf_counter() - start)
        results["vaeflow"] = metrics["test/log_likelihood"]
        memory["vaeflow"] = peak_memory_mib()
        start = time.perf_counter()
        estimates = [
            hand_log_likelihood(encoder, decoder, batch, args.samples, chunk)
            for batch in images.split(args.batch_size)
        ]
        times["hand"].append(time.perf_counter() - start)
        results["hand"] = torch.cat(estimates).mean().item()
        memory["hand"] = peak_memory_mib()

    print(
        f"vae_eval: {len(images)} MNIST test images, K = {args.samples}, batches of "
        f"{args.batch_size} examples x {chunk} samples, {torch.get_num_threads()} threads, "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'untrained model'}"
    )
    print(
        "vaeflow: Trainer.test (IW log-likelihood + ELBO, its parts, active units, KL per "
        "dimension); hand: the IW estimate alone"
    )
    for name in ("vaeflow", "hand"):
        print(
            f"  {name:8s} {statistics.median(times[name]):8.2f} s   log p(x) "
            f"{results[name]:9.3f} nats   peak RSS so far {memory[name]:7.0f} MiB"
        )
    ratio = statistics.median(times["vaeflow"]) / statistics.median(times["hand"])
    print(f"ratio vaeflow/hand {ratio:.3f} (target <= 1.00)")
    print(f"vaeflow test metrics: { {k: round(float(v), 3) for k, v in metrics.items()} }")


if __name__ == "__main__":
    main()
