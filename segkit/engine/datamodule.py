"""The LightningDataModule built from a config's ``data:`` section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from segkit.config import config_errors
from segkit.config_types import Bound, check_bounds_of
from segkit.data.coco import DatasetError
from segkit.errors import ConfigError
from segkit.registry import DATASETS, check_arguments

__all__ = ["SegkitDataModule", "build_datamodule", "check_data_config", "DATA_BOUNDS", "MAX_WORKERS"]

#: Loader worker processes per split (each is a process: a typo such as 10000 would exhaust the machine).
MAX_WORKERS = 256


class SegkitDataModule(pl.LightningDataModule):
    """Datasets and loaders for the train / val / test splits.

    Args:
        train, val, test: dataset configs (``{type: Shapes, split: train, ...}``) or ``None``.
        batch_size: images per process and step in training.
        val_batch_size: images per process in evaluation (default: ``batch_size``).
        num_workers: loader worker processes per split.
    """

    def __init__(self, *, train: Mapping[str, Any] | None = None, val: Mapping[str, Any] | None = None,
                 test: Mapping[str, Any] | None = None, batch_size: int = 2, val_batch_size: int | None = None,
                 num_workers: int = 0, persistent_workers: bool = False, pin_memory: bool = False,
                 drop_last: bool = False) -> None:
        super().__init__()
        self.split_cfgs = {"train": train, "val": val, "test": test}
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.datasets: dict[str, Dataset] = {}
        self.seed = 0  # orders the training set with the epoch (the config's seed, set by the engine)

    def build_dataset(self, split: str) -> Dataset:
        cfg = self.split_cfgs.get(split)
        if cfg is None:
            raise ConfigError(f"the config defines no '{split}' dataset (data.{split})", key=f"data.{split}")
        if split not in self.datasets:
            dataset = DATASETS.build(cfg, path=f"data.{split}")
            if len(dataset) == 0:
                raise DatasetError(
                    f"the {split} dataset (data.{split}, {cfg.get('type')}) has no images{_source(dataset)}: "
                    f"check its paths and split, and that filters such as skip_empty leave some images."
                )
            self.datasets[split] = dataset
        return self.datasets[split]

    def prepare_data(self) -> None:
        # Runs once per node before processes split up: generates synthetic data if needed.
        for split, cfg in self.split_cfgs.items():
            if cfg is not None:
                self.build_dataset(split)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "fit", ("train", "val")):
            if self.split_cfgs.get(split) is not None:
                self.build_dataset(split)

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        from segkit.data.collate import collate
        from segkit.engine.callbacks import EpochSampler

        dataset = self.build_dataset(split)
        # In training the order and the workers' seeds depend on (seed, epoch) only, so a resumed run replays.
        sampler = EpochSampler.for_trainer(dataset, self.trainer, seed=self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=None if sampler is None else sampler.generator,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if self.split_cfgs.get("test") else "val", train=False)


def _source(dataset: Any) -> str:
    """`` from <file or folder>`` for the first of a dataset's usual source attributes it has."""
    for name in ("ann_file", "img_dir", "root"):
        value = getattr(dataset, name, None)
        if isinstance(value, str):
            return f" (read from {value})"
    return ""


#: Ranges of the ``data:`` loader settings.
DATA_BOUNDS = {
    "batch_size": Bound(1, integer=True),
    "val_batch_size": Bound(1, integer=True, nullable=True, meaning="null: data.batch_size"),
    "num_workers": Bound(0, MAX_WORKERS, integer=True, meaning="0 loads in the main process"),
}


def check_data_config(data: Mapping[str, Any], *, path: str = "data") -> None:
    """Check the ``data:`` section without reading any data: its keys, types and ranges, and for each
    split a registered dataset type with arguments it takes.

    Raises:
        ConfigError: at the dotted key, with the allowed values.
    """
    check_arguments(SegkitDataModule, data, path=path, type_name="data", kind="section")
    check_bounds_of(data, DATA_BOUNDS, path=path)
    for split in ("train", "val", "test"):
        split_cfg = data.get(split)
        if split_cfg is None:
            continue
        if not isinstance(split_cfg, Mapping) or "type" not in split_cfg:
            raise ConfigError(f"a dataset is a mapping with a 'type' key, e.g. {{type: CocoDataset, ann_file: ...}}, "
                              f"or null; got {split_cfg!r}", key=f"{path}.{split}")
        kwargs = {k: v for k, v in split_cfg.items() if k != "type"}
        check_arguments(DATASETS.get(split_cfg["type"], key=f"{path}.{split}.type"), kwargs,
                        path=f"{path}.{split}", type_name=str(split_cfg["type"]), kind="dataset")


def build_datamodule(cfg: Mapping[str, Any]) -> SegkitDataModule:
    """Build the data module from ``cfg["data"]``, naming the file and key of any mistake."""
    data = dict(cfg.get("data") or {})
    with config_errors(cfg):
        check_data_config(data)
        return SegkitDataModule(**data)
