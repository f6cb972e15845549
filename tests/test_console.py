"""What `vaeflow fit` prints: lines about the run only, ending with where it went and what it
reached."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The kinds of line a quickstart run may print (progress bar off).
ALLOWED = (
    r"Seed set to \d+",
    r"part +type +parameters",  # the model summary
    r"\w+ +\w+ +[\d.]+ ?[KMB]?",
    r"[\d.]+ ?[KMB]? trainable parameters of [\d.]+ ?[KMB]? \([\d.]+ MB\)",
    r"`Trainer\.fit` stopped: `max_epochs=\d+` reached\.",
    r"run folder: .+",
    r"best checkpoint: .+\.ckpt",
    r"last checkpoint: .+last\.ckpt",
    r"final metrics: .+",
)


def test_the_quickstart_prints_only_lines_about_the_run(tmp_path: Path) -> None:
    config = str(REPO / "configs" / "quickstart.yaml")
    quick = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(
        [sys.executable, "-m", "vaeflow", "fit", "--config", config, *quick],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) for p in ALLOWED)]
    assert not unexpected, "\n".join(unexpected)
    closing = result.stdout.splitlines()[-4:]  # printed last (the log lines go to stderr)
    assert closing[0] == "run folder: runs/quickstart/version_0"
    assert closing[1].startswith("best checkpoint: runs/quickstart/version_0/checkpoints/")
    assert closing[2] == "last checkpoint: runs/quickstart/version_0/checkpoints/last.ckpt"
    assert re.search(r"val/elbo -\d+\.\d{4}", closing[3])
