"""Scale through Lightning: DDP from the command line, two "nodes" under torchrun on the loopback
address, and mixed precision (bf16 on the CPU, float16 with gradient scaling on a GPU).

The multi-process runs go through ``python -m vaeflow`` in subprocesses, as a user runs them:
Lightning's ``ddp`` strategy relaunches the same command for every further process, and
torchrun starts one agent per "node".
"""

from __future__ import annotations

import csv
import functools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from vaeflow.data import DigitsDataModule
from vaeflow.metrics import EpochMeans
from vaeflow.models import VAE
from vaeflow.nets import MLP

#: Seconds any one launch may take before the test fails instead of hanging (a lost peer makes
#: gloo wait 30 minutes by default).
LAUNCH_TIMEOUT = 240

#: A small VAE on the digits in batches of 64 per process. The test checks that each split
#: shards unevenly over two processes, where a mean of per-process means would differ from the
#: mean over all examples.
#: Eight samples of z per example for the ELBO and 64 for the importance-weighted bound keep
#: the Monte-Carlo noise of the epoch means small (see :func:`monte_carlo_tolerance`).
CONFIG = {
    "seed_everything": 0,
    "model": {
        "class_path": "vaeflow.models.VAE",
        "init_args": {
            "latent_dim": 4,
            "num_samples": 8,
            "eval_samples": 64,
            "encoder": {"class_path": "vaeflow.nets.MLP", "init_args": {"hidden": [32]}},
            "decoder": {"class_path": "vaeflow.nets.MLP", "init_args": {"hidden": [32]}},
        },
    },
    "data": {
        "class_path": "vaeflow.data.DigitsDataModule",
        "init_args": {"batch_size": 64, "binarize": "dynamic", "val_fraction": 0.1005},
    },
    "trainer": {
        "max_epochs": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
}


def data_module() -> DigitsDataModule:
    data = DigitsDataModule(**CONFIG["data"]["init_args"])
    data.setup()
    return data


def steps_per_epoch(processes: int) -> int:
    """Batches per process and epoch of the configured data, shared by ``processes``."""
    size = len(data_module().splits["train"])
    return math.ceil(math.ceil(size / processes) / CONFIG["data"]["init_args"]["batch_size"])


def write_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def environment() -> dict[str, str]:
    """One thread per process (two processes share the machine's cores), gloo on the loopback
    interface only, and a free port of the launch's own (tests run in parallel)."""
    loopback = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    return os.environ | loopback | {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}


def vaeflow(folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``python -m vaeflow ARGUMENTS`` in ``folder``; fails the test with its output unless it
    exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "vaeflow", *arguments],
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def logged(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def last_value(rows: list[dict[str, str]], name: str) -> float:
    return float([row[name] for row in rows if row.get(name)][-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def monte_carlo_tolerance(estimates: torch.Tensor) -> float:
    """Four standard deviations of the difference between the two processes' and one process's
    epoch means, from ``estimates`` ``(repeats, N)``: independent re-estimates of each
    example's value.

    One process's mean of N per-example estimates has variance s^2 = sum_i v_i / N^2 (v_i: the
    Monte-Carlo variance of example i). Under DDP every process is seeded alike, so the two
    shards draw the same noise at the same batch positions: the estimates of two examples can
    then be correlated, and by Cauchy-Schwarz the mean's variance is at most 2 s^2. Their
    difference has variance at most 3 s^2.
    """
    s = estimates.var(0).sum().sqrt() / estimates.shape[1]
    return 4 * math.sqrt(3) * float(s)


# -- DDP from the command line --------------------------------------------------------------------


@pytest.mark.ddp
def test_two_processes_train_resume_and_log_what_one_process_computes(tmp_path: Path) -> None:
    """``vaeflow fit --trainer.devices 2 --trainer.strategy ddp`` for one epoch, a resume from
    its checkpoint for a second, and ``vaeflow test`` on two processes: the logged validation and
    test means (over both shards) equal one process's evaluation of the same checkpoint. The KL
    is analytic, so it must agree to float32 round-off; the ELBO and the importance-weighted
    log-likelihood are Monte-Carlo estimates and agree within :func:`monte_carlo_tolerance`
    (measured: 0.21 and 0.05 nats on validation; the differences were 0.03 and 0.01)."""
    config = str(write_config(tmp_path))
    ddp = ("--config", config, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    vaeflow(tmp_path, "fit", *ddp)
    runs = tmp_path / "runs" / "tiny"  # the config file's stem
    (first,) = (runs / "version_0" / "checkpoints").glob("epoch=*.ckpt")
    steps = steps_per_epoch(2)
    assert first.name == f"epoch=0-step={steps}.ckpt"  # one epoch of half the data

    vaeflow(tmp_path, "fit", *ddp, "--trainer.max_epochs", "2", "--ckpt_path", str(first))
    (second,) = (runs / "version_1" / "checkpoints").glob("epoch=*.ckpt")
    assert second.name == f"epoch=1-step={2 * steps}.ckpt"  # the resume took epoch 1 only
    resumed = logged(runs / "version_1")
    assert {row["epoch"] for row in resumed} == {"1"}
    vaeflow(tmp_path, "test", *ddp, "--ckpt_path", str(second))
    tested = logged(runs / "version_2")

    # One process evaluates the same weights on the same validation and test data.
    model = VAE.load_from_checkpoint(second)
    single = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    pl.seed_everything(0)
    one = single.validate(model, data_module(), verbose=False)[0]
    one |= single.test(model, data_module(), verbose=False)[0]
    data = data_module()
    with torch.no_grad():
        for stage, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
            x = torch.cat(list(loader))
            assert len(x) % 2 == 1  # shards of unequal sizes
            rows = resumed if stage == "val" else tested
            elbo = torch.stack([model.elbo(x, model.num_samples) for _ in range(16)])
            likelihood = torch.stack([model.log_likelihood(x, 64) for _ in range(16)])
            assert last_value(rows, f"{stage}/kl") == pytest.approx(one[f"{stage}/kl"], rel=1e-5)
            for name, estimates in (("elbo", elbo), ("log_likelihood", likelihood)):
                tolerance = monte_carlo_tolerance(estimates)
                assert tolerance < 1.0  # the comparison means something
                two = last_value(rows, f"{stage}/{name}")
                assert two == pytest.approx(one[f"{stage}/{name}"], abs=tolerance), name


# -- several machines ----------------------------------------------------------------------------


@pytest.mark.ddp
def test_two_nodes_under_torchrun_train_as_one_job(tmp_path: Path) -> None:
    """Two torchrun agents on 127.0.0.1 (``--nnodes 2 --nproc-per-node 1``, node ranks 0 and 1)
    run ``vaeflow fit --trainer.num_nodes 2``: both exit 0, one run folder, one checkpoint, and
    an epoch takes the steps of half the data (each node trains on its own shard)."""
    config = str(write_config(tmp_path))
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    fit = ["-m", "vaeflow", "fit", "--config", config, "--trainer.num_nodes", "2"]
    fit += ["--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    nodes = [
        subprocess.Popen(
            [*command, "--node-rank", str(rank), *fit],
            cwd=tmp_path,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # no-op for a finished process; ends a hung one
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}\n{output}"
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    (checkpoint,) = (run / "checkpoints").glob("epoch=*.ckpt")
    assert checkpoint.name == f"epoch=0-step={steps_per_epoch(2)}.ckpt"
    assert math.isfinite(last_value(logged(run), "val/elbo"))


# -- mixed precision -----------------------------------------------------------------------------


def test_autocast_leaves_likelihood_kl_and_importance_weights_in_float32() -> None:
    """Under CPU bf16 autocast the networks' products run in bfloat16, but log p(x|z), the KL,
    log q(z|x) and the log-sum-exp of the importance weights are float32: the KL equals a
    float64 evaluation of the closed form on the same (bfloat16) encoder outputs to float32
    round-off, where bfloat16 arithmetic is off by up to 0.02 nats here (KLs of about 2 nats)."""
    torch.manual_seed(0)
    model = VAE((64,), latent_dim=16)
    data = DigitsDataModule(binarize="static")
    data.setup()
    x = data.splits["train"][:128]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.encoder(x)
        elbo, reconstruction, kl = model.elbo_terms(x, num_samples=4)
        weights = model.log_importance_weights(x, 8)
        log_likelihood = model.log_likelihood(x, 8)
    assert raw.dtype == torch.bfloat16  # autocast is on for the networks
    for value in (elbo, reconstruction, kl, weights, log_likelihood):
        assert value.dtype == torch.float32
    loc, raw_scale = raw.double().chunk(2, dim=-1)
    scale = torch.nn.functional.softplus(raw_scale) + 1e-6
    exact = (0.5 * (loc.square() + scale.square() - 1) - scale.log()).sum(-1)
    torch.testing.assert_close(kl.double(), exact, rtol=1e-5, atol=1e-5)


def test_epoch_means_keep_digits_whatever_the_metrics_dtype() -> None:
    """bfloat16 batch means over 1000 batches of 7: the sum and the count (exact in bfloat16
    only up to 256) stay exact, so the epoch mean is the float64 mean of the values given."""
    means = EpochMeans()
    values = -90 - torch.rand(1000, dtype=torch.float64)
    for value in values:
        means.update({"elbo": value.to(torch.bfloat16)}, batch_size=7)
    expected = values.to(torch.bfloat16).double().mean()
    computed = means.compute(lambda totals: totals)["elbo"]
    torch.testing.assert_close(computed, expected, rtol=1e-12, atol=0)


#: Nats the bf16-mixed validation ELBO may differ from float32's after the same steps.
BF16_MARGIN = 0.05
#: SGD's learning rate in the float16 test (SGD, unlike Adam, feels the gradients' scale).
SGD_LR = 0.1


def fit_digits(precision: str, accelerator: str = "cpu", **model_kwargs) -> float:
    """The config's VAE (one sample of z) trained 3 epochs at ``precision`` from
    seed 0, and the validation ELBO of its weights evaluated in float32 with 64 samples."""
    pl.seed_everything(0)
    hidden = functools.partial(MLP, hidden=[32])
    model = VAE((64,), latent_dim=4, encoder=hidden, decoder=hidden, **model_kwargs)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=3,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data_module())
    model = model.cpu().float()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x = torch.cat(list(data_module().val_dataloader()))
    pl.seed_everything(1)
    with torch.no_grad():
        return model.elbo(x, 64).mean().item()


def test_bf16_mixed_trains_the_vae_as_float32_does() -> None:
    """bf16-mixed on the CPU: no NaN, and after the same steps from the same start the
    validation ELBO is within :data:`BF16_MARGIN` of float32's.

    bfloat16 keeps 8 bits of mantissa in the networks' products, so the trajectories drift
    apart, but Adam's normalised steps barely feel it: measured 1e-4 to 1e-3 nats after 63
    steps (three seeds, and as the data module changed), while another initialisation seed
    moves the ELBO by about 1 nat. The margin sits 50x above the first and 20x below the second.
    """
    full = fit_digits("32-true")
    mixed = fit_digits("bf16-mixed")
    assert math.isfinite(mixed)
    assert mixed == pytest.approx(full, abs=BF16_MARGIN)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="16-mixed (float16 with gradient scaling) runs on CUDA only; no CUDA device here",
)
@pytest.mark.parametrize("gradient_clip_val", [None, 1e3])
def test_16_mixed_on_a_gpu_trains_the_vae_as_float32_does(gradient_clip_val) -> None:
    """float16 with Lightning's gradient scaler: no NaN, the ELBO within 1 nat of float32's
    (looser than bf16's margin: the scaler skips the first steps, whose scaled gradients
    overflow float16, while it lowers its scale). A clip value the true gradients never reach
    (measured on the CPU: same weights with and without it) changes nothing, so clipping sees
    unscaled gradients; clipping the scaled ones, 65536 times larger, would stall SGD about
    16 nats below."""
    sgd = functools.partial(torch.optim.SGD, lr=SGD_LR)  # Adam would undo a wrong clip's scale
    full = fit_digits("32-true", accelerator="gpu", optimizer=sgd)
    mixed = fit_digits(
        "16-mixed", accelerator="gpu", optimizer=sgd, gradient_clip_val=gradient_clip_val
    )
    assert mixed == pytest.approx(full, abs=1.0)
