"""`vaeflow fit` of factor analysis over a ``.npy`` file larger than the machine's memory.

The script writes a float32 ``.npy`` file of ``--gigabytes`` of rows drawn from a known factor
model (D = ``--dim`` features, M = ``--factors`` factors, heteroscedastic noise), chunk by
chunk, so that it never holds more than one chunk. It then runs ``vaeflow fit`` on it as a
subprocess, from a YAML of ``ArrayDataModule(path)`` and ``FactorAnalysis(latent_dim,
method)``. The data module streams the file (its default for a ``.npy`` file over a quarter of
memory, :class:`vaeflow.data.stream.MappedRows`; the YAML says ``stream: true`` so that small
trial runs stream too). While the fit runs, the script polls the
resident memory of the process tree every 0.1 s (psutil; each process's RSS, which counts the
pages of the file it has mapped, RssFile, but not the kernel's page cache). It deletes the file
at the end, whatever happened.

With ``method: moments`` (the default of ``auto`` for D <= 4096) the fit reads the file once:
one pass sums n, sum x and sum x x^T in float64, and EM then runs on the D x D covariance. With
``--method streaming`` each EM iteration is one more pass (after three for the mean, the
variances and the PPCA start), so ``--max-iter`` bounds the time.

The fit is checked against the truth:

- the fitted model's mean log-likelihood of the training data (``train/log_likelihood``, exact
  over every row) against the true model's expected log-likelihood,
  -(D log 2 pi + log det C + D) / 2 with C = W W^T + Psi. With N rows the sample mean of the
  true model's log-likelihood is within a few sqrt(D / (2 N)) of it, and the maximum-likelihood
  fit exceeds the true parameters' value by about (number of parameters) / (2 N);
- both models' mean log-likelihood of the first ``--check-rows`` rows, computed here in float64;
- the largest principal angle between the fitted and the true loadings' column spaces.

    python benchmarks/fa_memmap.py --gigabytes 30 --folder /work/tmp/fa_memmap
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from scipy.linalg import subspace_angles

from vaeflow.models import FactorAnalysis

CHUNK_ROWS = 65_536


class TrueModel:
    """A factor model with a known log-likelihood: x = W z + mu + e, e ~ N(0, Psi)."""

    def __init__(self, dim: int, factors: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.loadings = rng.normal(size=(dim, factors))
        self.noise_variance = np.geomspace(0.1, 2.0, dim)
        self.mean = rng.normal(size=dim)
        self.seed = seed

    @property
    def covariance(self) -> np.ndarray:
        return self.loadings @ self.loadings.T + np.diag(self.noise_variance)

    def expected_log_likelihood(self) -> float:
        """E[log p(x)] under the model itself: -(D log 2 pi + log det C + D) / 2."""
        dim = len(self.mean)
        return -0.5 * (dim * math.log(2 * math.pi) + np.linalg.slogdet(self.covariance)[1] + dim)

    def write(self, path: Path, rows: int) -> float:
        """Write ``rows`` float32 examples as a .npy file, one chunk at a time; the seconds."""
        start = time.perf_counter()
        dim, factors = self.loadings.shape
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
        rng = np.random.default_rng((self.seed, 1))
        scale = np.sqrt(self.noise_variance).astype(np.float32)
        loadings_t = self.loadings.T.astype(np.float32)
        with path.open("wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            for low in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - low)
                chunk = rng.standard_normal((n, dim), dtype=np.float32)
                chunk *= scale
                chunk += rng.standard_normal((n, factors), dtype=np.float32) @ loadings_t
                chunk += self.mean.astype(np.float32)
                file.write(chunk.tobytes())
        return time.perf_counter() - start


def log_likelihood(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> float:
    """Mean log N(x; mean, covariance) over the rows, in float64."""
    chol = np.linalg.cholesky(covariance)
    centred = np.linalg.solve(chol, (x - mean).T)
    dim = len(mean)
    log_det = 2 * np.log(np.diag(chol)).sum()
    return float(-0.5 * (dim * math.log(2 * math.pi) + log_det + (centred**2).sum(0).mean()))


class MemoryPoller:
    """The largest total resident memory of a process and its children, polled in a thread;
    with the RssAnon (heap) and RssFile (mapped file pages) parts at that moment."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, int]:
        total = {"rss": 0, "anon": 0, "file": 0}
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            for key, name in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
                total[key] += int(fields.get(name, "0 kB").split()[0]) * 1024
        return total

    def run(self) -> None:
        while not self.done.is_set():
            try:
                now = self.sample()
            except psutil.NoSuchProcess:
                return
            if now["rss"] > self.peak["rss"]:
                self.peak = now
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join()
        return self.peak


CONFIG = """\
seed_everything: 0
model:
  class_path: vaeflow.models.FactorAnalysis
  init_args: {{latent_dim: {factors}, method: {method}, max_iter: {max_iter}}}
data:
  class_path: vaeflow.data.ArrayDataModule
  init_args: {{path: {path}, val_fraction: 0.0, stream: true}}
trainer:
  accelerator: cpu
  max_epochs: -1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {runs}, name: fa_memmap}}
"""


def load() -> str:
    """The load averages over 1, 5 and 15 minutes, as `uptime` prints them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def fit(args: argparse.Namespace, path: Path, folder: Path) -> dict[str, float]:
    """Run ``vaeflow fit`` on the file; its seconds and peak memory."""
    config = folder / "fa_memmap.yaml"
    config.write_text(
        CONFIG.format(
            factors=args.factors,
            method=args.method,
            max_iter=args.max_iter,
            path=path,
            runs=folder / "runs",
        )
    )
    vaeflow = Path(sys.executable).with_name("vaeflow")
    start = time.perf_counter()
    process = subprocess.Popen([str(vaeflow), "fit", "--config", str(config)])
    poller = MemoryPoller(process.pid)
    code = process.wait()
    seconds = time.perf_counter() - start
    peak = poller.stop()
    if code != 0:
        raise SystemExit(f"vaeflow fit failed with exit status {code}")
    return {"fit_seconds": seconds, **{f"peak_{k}_gb": v / 1e9 for k, v in peak.items()}}


def check(truth: TrueModel, path: Path, folder: Path, rows: int) -> dict[str, float]:
    """The fitted model against the true one (see the module's docstring)."""
    run = max((folder / "runs" / "fa_memmap").glob("version_*"), key=os.path.getmtime)
    metrics = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    column = metrics[0].index("train/log_likelihood")
    fitted = [float(row[column]) for row in metrics[1:] if row[column]][-1]
    model = FactorAnalysis.load_from_checkpoint(next(run.glob("checkpoints/*.ckpt")))
    loadings = model.loadings.detach().double().numpy()
    noise = model.noise_variance.detach().double().numpy()
    mean = model.mean.detach().double().numpy()
    sample = np.load(path, mmap_mode="r")[:rows].astype(np.float64)
    return {
        "fitted_train_log_likelihood": fitted,
        "true_expected_log_likelihood": truth.expected_log_likelihood(),
        "fitted_check_log_likelihood": log_likelihood(
            sample, mean, loadings @ loadings.T + np.diag(noise)
        ),
        "true_check_log_likelihood": log_likelihood(sample, truth.mean, truth.covariance),
        "largest_angle_degrees": float(np.degrees(subspace_angles(loadings, truth.loadings)[0])),
        "iterations": int(model.n_iter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=30.0, help="size of the file (1e9 B)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--factors", type=int, default=10)
    parser.add_argument("--method", choices=["moments", "streaming"], default="moments")
    parser.add_argument("--max-iter", type=int, default=200, help="EM iterations at most")
    parser.add_argument("--check-rows", type=int, default=200_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fa_memmap"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = int(args.gigabytes * 1e9) // (4 * args.dim)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / "fa_memmap.npy"
    needed = rows * args.dim * 4
    free = shutil.disk_usage(args.folder).free
    if needed > free - 2e9:
        raise SystemExit(f"{needed / 1e9:.1f} GB needed in {args.folder}, {free / 1e9:.1f} free")
    truth = TrueModel(args.dim, args.factors, args.seed)
    report: dict[str, object] = {
        "rows": rows,
        "dim": args.dim,
        "factors": args.factors,
        "file_gb": needed / 1e9,
        "memory_gb": psutil.virtual_memory().total / 1e9,
        "method": args.method,
        "load_at_start": load(),
    }
    try:
        report["write_seconds"] = truth.write(path, rows)
        report["load_after_writing"] = load()
        report |= fit(args, path, args.folder)
        report["load_after_fit"] = load()
        report |= check(truth, path, args.folder, min(args.check_rows, rows))
    finally:
        path.unlink(missing_ok=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
