"""A conditional VAE on MNIST: are its class-conditional samples of the class they were drawn
for? A separately trained classifier on the pixels of MNIST's training images names the class of
each sample: a one-hidden-layer perceptron (``--judge mlp``, the default: about 98% on real test
digits) or multinomial logistic regression (``--judge logistic``: about 92%, which caps any
sample's score near its own).

Protocol: ``configs/cvae_mnist.yaml`` (the one-hot digit given to encoder and decoder) built by
the CLI as ``vaeflow fit`` builds it, trained ``--epochs`` epochs without validation, pictures or
logging. Then ``--samples`` draws per class z ~ p(z), x ~ p(x | z, c): the classifier's accuracy
on the means E[x | z, c] (what the pictures show) and on binary draws x ~ p(x | z, c), beside
its accuracy on MNIST's real test images (the ceiling it can reach).

    python benchmarks/conditional_mnist.py --data-root /tmp/vaeflow_data --epochs 30
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from quiet_fit import quiet_fit_overrides
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from vaeflow.cli import VaeflowCLI
from vaeflow.data import MNISTDataModule

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cvae_mnist.yaml"
CLASSES = 10


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """The config's conditional VAE after ``--epochs`` epochs, and seconds per epoch."""
    overrides = [
        f"--data.init_args.root={args.data_root}",
        f"--trainer.max_epochs={args.epochs}",
        *quiet_fit_overrides("cvae_mnist_", validate=False),
    ]
    cli = VaeflowCLI(args=["--config", str(CONFIG), *overrides], run=False)
    began = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli.model.eval(), (time.perf_counter() - began) / args.epochs


JUDGES = {
    "mlp": lambda: MLPClassifier((256,), max_iter=20, early_stopping=True, random_state=0),
    "logistic": lambda: LogisticRegression(max_iter=300),
}


def classifier(args: argparse.Namespace) -> tuple[ClassifierMixin, float]:
    """The ``--judge`` trained on ``--classifier-examples`` training images in [0, 1], and its
    accuracy on the 10,000 test images."""
    data = MNISTDataModule(root=args.data_root, val_fraction=0.0)
    data.setup()
    rows = slice(0, args.classifier_examples)
    x, y = data.splits["train"][rows].numpy(), data.labels("train")[rows].numpy()
    model = JUDGES[args.judge]().fit(x, y)
    accuracy = model.score(data.splits["test"].numpy(), data.labels("test").numpy())
    return model, float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="a folder holding MNIST/raw/*.gz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000, help="draws per class")
    parser.add_argument("--classifier-examples", type=int, default=60_000)
    parser.add_argument("--judge", choices=sorted(JUDGES), default="mlp")
    args = parser.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.2f} (shared machine)"
    )
    model, seconds = train(args)
    print(f"conditional VAE: {args.epochs} epochs, {seconds:.1f} s per epoch")
    judge, real = classifier(args)
    print(f"classifier: {args.judge} on {args.classifier_examples} training images")
    print(f"  accuracy on the real test images: {real:.4f}")
    torch.manual_seed(0)
    classes = torch.arange(CLASSES).repeat_interleave(args.samples)
    condition = F.one_hot(classes, CLASSES).float()
    with torch.no_grad():
        z = model.prior().sample((len(classes),))
        decoded = model.decode(z, condition=condition)
        draws = {
            "means E[x | z, c]": decoded.mean,
            "binary draws x ~ p(x | z, c)": decoded.sample(),
        }
    for name, images in draws.items():
        predicted = judge.predict(images.reshape(len(classes), -1).numpy())
        hits = predicted == classes.numpy()
        per_class = [float(hits[classes.numpy() == k].mean()) for k in range(CLASSES)]
        print(
            f"  accuracy on {args.samples} samples per class, {name}: {hits.mean():.4f} "
            f"(worst class {int(np.argmin(per_class))}: {min(per_class):.4f})"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
