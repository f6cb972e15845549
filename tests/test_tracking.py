"""Tracking: `vaeflow fit` with configs/logging/wandb.yaml, offline, read back from W&B's own
transaction log (the run's .wandb file); the run folder, the config's one copy as
hyperparameters, secrets kept out; TensorBoard beside it."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from vaeflow.callbacks.tracking import REDACTED, redact
from vaeflow.cli import main

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: A short quickstart: two epochs of a few batches, validation each epoch.
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"]
SHORT += ["--trainer.enable_progress_bar", "false", "--model.init_args.eval_samples", "2"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline in a folder of the test's own: no account, no network, no files elsewhere."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    wandb.finish()  # the run a fit leaves open (Lightning's logger never finishes it)
    wandb.teardown()  # W&B keeps the first run's working directory for the process otherwise


def fit(*args: str) -> None:
    """``vaeflow fit`` in this process, then finish the W&B run so its file is complete."""
    main(["fit", *args])
    wandb.finish()


# -- reading an offline run: W&B's transaction log (LevelDB's log format, a W&B header) ---------

HEADER = 7  # ":W&B", magic, version
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a .wandb file, in the order the run wrote them."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = HEADER, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (FIRST, MIDDLE):
            pending += chunk
        else:
            break


def key(item: object) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline run recorded: config, history rows, artifacts (name -> files)."""

    def __init__(self, path: Path) -> None:
        self.config: dict[str, object] = {}
        self.rows: list[dict[str, object]] = []
        self.artifacts: dict[str, tuple[str, list[str]]] = {}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "config":
                for item in record.config.update:
                    self.config[key(item)] = json.loads(item.value_json)
            elif kind == "history":
                self.rows.append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "artifact":
                files = [entry.path for entry in record.artifact.manifest.contents]
                self.artifacts[record.artifact.name] = (record.artifact.type, files)

    def rows_with(self, name: str) -> list[dict[str, object]]:
        return [row for row in self.rows if name in row]


def offline_runs(root: Path, timeout: float = 60.0) -> list[OfflineRun]:
    """Every offline run under ``root``, read once W&B's service has written its last record
    (it writes the file in the background; ``wandb.finish`` returns before)."""
    paths = sorted(root.glob("runs/wandb/offline-run-*/*.wandb"))
    deadline = time.monotonic() + timeout
    while not all(finished(path) for path in paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [OfflineRun(path) for path in paths]


def finished(path: Path) -> bool:
    return any(record.WhichOneof("record_type") == "exit" for record in records(path))


def test_quickstart_offline_run_records_config_metrics_pictures_and_artifacts(
    offline: Path,
) -> None:
    fit(
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "logging/wandb.yaml"),
        *SHORT,
    )
    [run] = offline_runs(offline)
    # the resolved config, once: nested sections, not the model's init args a second time
    assert run.config["model"]["init_args"]["latent_dim"] == 8
    assert run.config["data"]["class_path"] == "vaeflow.data.DigitsDataModule"
    assert run.config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    assert "latent_dim" not in run.config and "_instantiator" not in run.config
    assert "config" not in run.config  # the --config paths are not settings
    train, val = run.rows_with("train/elbo"), run.rows_with("val/elbo")
    assert len(train) == 2 and len(val) >= 2  # per epoch (val: the sanity check too)
    assert all(isinstance(row["trainer/global_step"], int) for row in train + val)
    for kind in ("reconstructions", "samples", "traversals", "interpolations", "latent_scatter"):
        [row] = run.rows_with(f"pictures/{kind}/filenames")  # the end of training (epoch 1)
        assert row[f"pictures/{kind}/_type"] == "images/separated"
    [(name, (kind, files))] = run.artifacts.items()
    assert name.startswith("config-") and kind == "config" and files == ["config.yaml"]
    # the run folder: runs/<project>/<run id>/ holds config, checkpoints and pictures
    [folder] = (offline / "runs" / "vaeflow").iterdir()
    assert (folder / "config.yaml").is_file() and not (offline / "runs" / "config.yaml").exists()
    assert (
        yaml.safe_load((folder / "config.yaml").read_text())["model"]["init_args"]["latent_dim"]
        == 8
    )
    assert list((folder / "checkpoints").glob("*.ckpt"))
    assert len(list((folder / "pictures").glob("*/epoch=0001.png"))) == 5


def test_second_run_in_the_same_folder_gets_a_folder_of_its_own(offline: Path) -> None:
    """LightningCLI's saver writes into the logger's log_dir, which for W&B is the save_dir
    that every run shares: the second run would refuse to overwrite the first's config."""
    for _ in range(2):
        fit(
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--config",
            str(CONFIGS / "logging/wandb.yaml"),
            *SHORT[:4],
        )
    folders = list((offline / "runs" / "vaeflow").iterdir())
    assert len(folders) == 2 and all((f / "config.yaml").is_file() for f in folders)


def test_checkpoints_become_artifacts_with_log_model(offline: Path) -> None:
    fit(
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(CONFIGS / "logging/wandb.yaml"),
        *SHORT[:4],
        "--trainer.logger.init_args.log_model",
        "true",
    )
    [run] = offline_runs(offline)
    models = [files for kind, files in run.artifacts.values() if kind == "model"]
    assert models and all(files == ["model.ckpt"] for files in models)


def test_factor_analysis_logs_every_em_iteration_and_validation_rows_are_kept(
    offline: Path,
) -> None:
    """W&B takes rows on its own step, with the trainer's step as a column: a validation row
    whose trainer step is lower than the training rows logged before it is kept."""
    fit(
        "--config",
        str(CONFIGS / "ppca_digits.yaml"),
        "--config",
        str(CONFIGS / "logging/wandb.yaml"),
        "--trainer.enable_progress_bar",
        "false",
    )
    [run] = offline_runs(offline)
    train = run.rows_with("train/log_likelihood")
    steps = [row["trainer/global_step"] for row in train]
    assert len(steps) > 1 and steps == sorted(set(steps))  # one row per EM iteration
    assert all(row["em_iteration"] == row["trainer/global_step"] for row in train)
    [val] = [
        row for row in run.rows_with("val/log_likelihood") if row["_step"] > train[-1]["_step"]
    ]
    assert val["trainer/global_step"] <= steps[-1]  # logged last, with no later a step
    assert run.rows_with("pictures/loadings/filenames") and run.rows_with(
        "pictures/log_likelihood/filenames"
    )


def test_tensorboard_gets_metrics_config_and_pictures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--config",
            str(CONFIGS / "logging/tensorboard.yaml"),
            *SHORT,
        ]
    )
    [folder] = (tmp_path / "runs" / "quickstart").iterdir()
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    assert "train/elbo" in events.Tags()["scalars"]
    assert {"pictures/reconstructions", "pictures/samples"} <= set(events.Tags()["images"])
    assert (folder / "config.yaml").is_file()
    assert (
        yaml.safe_load((folder / "hparams.yaml").read_text())["model"]["init_args"]["latent_dim"]
        == 8
    )


def test_secrets_are_redacted_wherever_they_sit() -> None:
    config = Namespace(
        trainer=Namespace(logger=Namespace(init_args=Namespace(api_key="abc", project="p"))),
        callbacks=[{"init_args": {"token": "t", "every": 3}}],
        password=None,
    )
    clean = redact(config)
    assert clean.trainer.logger.init_args.api_key == REDACTED
    assert clean.trainer.logger.init_args.project == "p"
    assert clean.callbacks == [{"init_args": {"token": REDACTED, "every": 3}}]
    assert clean.password is None  # nothing to hide
    assert config.trainer.logger.init_args.api_key == "abc"  # the original is left as it was
