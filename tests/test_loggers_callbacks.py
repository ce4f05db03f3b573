"""Lightning's loggers and callbacks from ``trainer.logger`` / ``trainer.callbacks``: short names and
class paths, segkit's defaults, what a run writes and stores, and the messages for wrong specs (a
class_path never imports code)."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

import segkit
from segkit.checkpoint import CONFIG_KEY
from segkit.config import dump_config
from segkit.engine import runner
from segkit.engine.config_check import check_run_config
from segkit.engine.loggers import storable_config
from segkit.errors import ConfigError
from tests.conftest import TINY_CONFIG

QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=1",
         "data.val.num_images=4"]

_HOOKS = """
import json
import pytorch_lightning as pl


class RecordHooks(pl.Callback):
    \"\"\"Writes the hooks Lightning called, one name a line, to ``path``.\"\"\"

    def __init__(self, path: str, tag: str = "") -> None:
        self.path = path

    def _note(self, name):
        with open(self.path, "a") as f:
            f.write(name + "\\n")

    def on_train_start(self, trainer, pl_module):
        self._note("on_train_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._note("on_train_batch_end")

    def on_validation_end(self, trainer, pl_module):
        self._note("on_validation_end " + json.dumps(sorted(trainer.callback_metrics)))


class NotACallback:
    pass
"""


def _config(tmp_path: Path, extra: str = "", *, data: Path | None = None) -> Path:
    """The tiny config (Shapes images under ``data``); with ``extra``, a config ``run.yaml`` of ``extra`` on top of it."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_CONFIG.format(root=data or tmp_path / "data", work_dir=tmp_path / "work")))
    if not extra:
        return path
    run = tmp_path / "run.yaml"
    run.write_text("_base_: tiny.yaml\n" + textwrap.dedent(extra))
    return run


def _with_hooks(tmp_path: Path, stem: str, extra: str) -> Path:
    (tmp_path / f"{stem}.py").write_text(_HOOKS)
    return _config(tmp_path, f"imports: [{stem}.py]\n" + textwrap.dedent(extra))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of generated Shapes images for the training runs of this module."""
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def configured_run(tmp_path_factory: pytest.TempPathFactory, shapes_data: Path) -> Path:
    """One short run with CSV + TensorBoard loggers by short and class name, a LearningRateMonitor by
    class name and a callback of the config's own module."""
    root = tmp_path_factory.mktemp("configured")
    cfg_path = _config(root, data=shapes_data)
    (root / "run_hooks.py").write_text(_HOOKS)
    cfg = segkit.load_config(cfg_path, [*QUICK, "imports=[" + str(root / "run_hooks.py") + "]",
                                        "trainer.logger=[csv, {class_path: TensorBoardLogger}]",
                                        "trainer.callbacks=[{class_path: run_hooks.RecordHooks, init_args: "
                                        f"{{path: '{root / 'hooks.txt'}'}}}}, {{class_path: LearningRateMonitor, "
                                        "init_args: {logging_interval: step}}]"])
    runner.train(cfg)
    return root


def test_csv_and_tensorboard_loggers_write_to_work_dir_logs(configured_run: Path):
    version = configured_run / "work" / "logs" / "version_0"
    with open(version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss", "time/step", "bbox/AP"} <= columns and any(c.startswith("lr-") for c in columns)
    assert [r for r in rows if r.get("train/loss")] and [r for r in rows if r.get("bbox/AP")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = version.glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "time/step", "bbox/AP"} <= set(tags) and any(t.startswith("lr-") for t in tags)


def test_callback_from_the_configs_imports_runs(configured_run: Path):
    lines = (configured_run / "hooks.txt").read_text().splitlines()
    assert lines[0] == "on_train_start" and lines.count("on_train_batch_end") == 2
    assert any(line.startswith("on_validation_end") and "bbox/AP" in line for line in lines)


def test_config_dump_and_checkpoint_carry_the_specs_as_config(configured_run: Path):
    work = configured_run / "work"
    dumped = yaml.safe_load((work / "config.yaml").read_text())["trainer"]
    stored = torch.load(work / "checkpoints" / "last.ckpt", weights_only=True)[CONFIG_KEY]["trainer"]
    for trainer in (dumped, stored):
        assert trainer["logger"] == ["csv", {"class_path": "TensorBoardLogger"}]
        assert trainer["callbacks"][0] == {"class_path": "run_hooks.RecordHooks",
                                           "init_args": {"path": str(configured_run / "hooks.txt")}}
        assert trainer["callbacks"][1] == {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "step"}}


def test_a_configured_learning_rate_monitor_is_not_doubled(tmp_path: Path):
    cfg = segkit.load_config(_config(tmp_path), ["trainer.callbacks=[LearningRateMonitor]"])
    trainer = runner.build_trainer(cfg, work_dir=str(tmp_path / "work"))
    monitors = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.LearningRateMonitor)]
    assert len(monitors) == 1 and monitors[0].logging_interval is None  # the user's, with its own settings


def test_early_stopping_by_short_name_monitors_the_main_metric_and_stops_the_run(tmp_path: Path, shapes_data: Path):
    # Every AP is above -2: stopping_threshold stops at the first evaluation, with mode max (segkit's default).
    cfg = segkit.load_config(_config(tmp_path, data=shapes_data), [*QUICK, "trainer.max_epochs=3", "trainer.limit_train_batches=1",
                                                 "trainer.callbacks=[{class_path: EarlyStopping, init_args: "
                                                 "{stopping_threshold: -2.0}}]"])
    runner.train(cfg)
    history = yaml.safe_load((tmp_path / "work" / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [0]


def test_loggers_and_callbacks_given_as_objects_are_stored_by_class_path(tmp_path: Path):
    cfg = segkit.load_config(_config(tmp_path))
    logger = pl.loggers.CSVLogger(save_dir=str(tmp_path / "elsewhere"))
    cfg["trainer"]["logger"] = [logger, "tensorboard"]
    cfg["trainer"]["callbacks"] = [pl.callbacks.EarlyStopping(monitor="bbox/AP", mode="max")]
    stored = storable_config(cfg)
    assert stored["trainer"]["logger"] == [{"class_path": "pytorch_lightning.loggers.csv_logs.CSVLogger"},
                                           "tensorboard"]
    assert stored["trainer"]["callbacks"] == [
        {"class_path": "pytorch_lightning.callbacks.early_stopping.EarlyStopping"}]
    assert yaml.safe_load(dump_config(stored))["trainer"] == stored["trainer"]
    assert cfg["trainer"]["logger"][0] is logger and stored.filename == cfg.filename
    check_run_config(stored)  # the record is a valid config
    trainer = runner.build_trainer(cfg, work_dir=str(tmp_path / "work"))
    assert trainer.loggers[0] is logger


def _error(cfg_path: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_run_config(segkit.load_config(cfg_path, list(overrides)))
    return info.value


def test_unknown_logger_name_suggests_the_nearest(tmp_path: Path):
    path = _config(tmp_path, "trainer: {logger: [csv, tensorbord]}\n")
    error = _error(path)
    assert error.key == "trainer.logger[1]" and error.file == str(path)
    assert "unknown logger 'tensorbord'" in str(error) and "Did you mean 'tensorboard'?" in str(error)
    error = _error(_config(tmp_path), "trainer.logger={class_path: WandLogger}")
    assert error.key == "trainer.logger.class_path" and "Did you mean 'WandbLogger'" in str(error)
    assert "command line" in str(error)


def test_unknown_init_arg_names_key_file_and_suggestion(tmp_path: Path):
    path = _with_hooks(tmp_path, "arg_hooks", """
        trainer:
          callbacks:
            - LearningRateMonitor
            - class_path: EarlyStopping
              init_args: {monitr: bbox/AP, patience: 2}
        """)
    error = _error(path)
    assert error.key == "trainer.callbacks[1].init_args.monitr" and error.file == str(path)
    assert "Did you mean 'monitor'?" in str(error) and str(path) in str(error)


def test_class_path_in_a_module_not_imported_is_refused_without_importing_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "stranger_callbacks.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import pytorch_lightning as pl\nclass Spy(pl.Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    error = _error(_config(tmp_path), "trainer.callbacks=[stranger_callbacks.Spy]")
    assert error.key == "trainer.callbacks[0]" and "not imported" in str(error) and "imports:" in str(error)
    assert not marker.exists() and "stranger_callbacks" not in sys.modules


def test_a_class_that_is_not_a_callback_is_refused(tmp_path: Path):
    path = _with_hooks(tmp_path, "plain_hooks", """
        trainer:
          callbacks: [{class_path: plain_hooks.NotACallback}]
        """)
    error = _error(path)
    assert error.key == "trainer.callbacks[0].class_path" and "is not a callback" in str(error)
    error = _error(_config(tmp_path), "trainer.callbacks=[pytorch_lightning.loggers.CSVLogger]")
    assert "is not a callback" in str(error)


def test_a_model_checkpoint_may_not_write_segkits_own_files(tmp_path: Path):
    error = _error(_config(tmp_path), "trainer.callbacks=[{class_path: ModelCheckpoint, init_args: {save_last: true}}]")
    assert error.key == "trainer.callbacks[0].init_args.save_last" and "last.ckpt" in str(error)
    cfg = segkit.load_config(_config(tmp_path), ["trainer.callbacks=[ModelCheckpoint]"])  # the same as best.ckpt
    with pytest.raises(ConfigError, match="engine.keep_best") as info:
        runner.build_trainer(cfg, work_dir=str(tmp_path / "work"))
    assert info.value.key == "trainer.callbacks[0]"
    cfg = segkit.load_config(_config(tmp_path), ["trainer.callbacks=[{class_path: ModelCheckpoint, init_args: "
                                                 "{every_n_epochs: 2, save_top_k: -1, monitor: null}}]"])
    trainer = runner.build_trainer(cfg, work_dir=str(tmp_path / "work"))
    assert trainer.checkpoint_callbacks[0].dirpath == str(tmp_path / "work" / "checkpoints")


def test_evaluation_reads_no_logger_or_callback_specs(tmp_path: Path):
    """A checkpoint's stored config may name callbacks of modules it lists under imports:, which are
    never imported; evaluating it does not need them."""
    cfg = segkit.load_config(_config(tmp_path), ["trainer.callbacks=[not_imported_module.Callback]"])
    check_run_config(cfg, training=False)


def test_wandb_logger_offline_writes_under_work_dir(tmp_path: Path, shapes_data: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = segkit.load_config(_config(tmp_path, data=shapes_data), [*QUICK, "trainer.logger={class_path: wandb, init_args: "
                                                 "{offline: true, project: segkit-test}}"])
    runner.train(cfg)
    assert list((tmp_path / "work" / "wandb").glob("offline-run-*"))


def test_mlflow_logger_writes_its_store_under_work_dir(tmp_path: Path, shapes_data: Path):
    mlflow = pytest.importorskip("mlflow")
    cfg = segkit.load_config(_config(tmp_path, data=shapes_data), [*QUICK, "trainer.logger=[csv, mlflow]"])
    runner.train(cfg)
    work = tmp_path / "work"
    assert (work / "logs" / "version_0" / "metrics.csv").is_file()
    database = work / "mlflow.db"
    uri = f"sqlite:///{database}" if database.is_file() else (work / "mlruns").as_uri()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert any("loss" in key for key in run.data.metrics)
