"""`segkit plot`: the curves of a run from its CSV logs, a resumed run's logs joined."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from segkit.cli import main
from segkit.engine.plot import plot_panels, read_logs, smooth


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny detector trained 2 epochs, then resumed to 3 (evaluated every epoch): logs/version_0 and _1."""
    from tests.conftest import TINY_CONFIG

    root = tmp_path_factory.mktemp("plot")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(root=root / "data", work_dir=root / "work"))
    common = ["trainer.check_val_every_n_epoch=1"]
    assert main(["train", str(cfg), "trainer.max_epochs=2", *common]) == 0
    assert main(["train", str(cfg), "trainer.max_epochs=3", *common, "--resume", "auto"]) == 0
    return root / "work"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_both_loggers_write_into_the_same_version_folders(resumed_run: Path):
    for version in ("version_0", "version_1"):
        folder = resumed_run / "logs" / version
        assert (folder / "metrics.csv").is_file() and list(folder.glob("events.out.tfevents.*")), version
    columns = set(_csv_rows(resumed_run / "logs" / "version_0" / "metrics.csv")[0])
    assert {"train/loss", "train/loss_cls", "lr-AdamW", "time/data", "time/step", "bbox/AP"} <= columns


def test_iteration_times_are_logged_every_step(resumed_run: Path):
    rows = _csv_rows(resumed_run / "logs" / "version_0" / "metrics.csv")
    steps = [r for r in rows if r.get("train/loss")]
    data = [float(r["time/data"]) for r in steps]
    step = [float(r["time/step"]) for r in steps]
    assert len(steps) == 8 and all(t >= 0 for t in data) and all(t > 0 for t in step)
    assert sum(data) < sum(step)  # in-memory Shapes data: loading is the small part


def test_read_logs_returns_the_logged_values_of_both_runs_in_order(resumed_run: Path):
    first = _csv_rows(resumed_run / "logs" / "version_0" / "metrics.csv")
    second = _csv_rows(resumed_run / "logs" / "version_1" / "metrics.csv")
    series = read_logs(resumed_run)
    loss = series["train/loss"]
    logged = [(int(r["step"]), float(r["train/loss"])) for r in first + second if r.get("train/loss")]
    assert list(zip(loss.steps, loss.values)) == logged  # the resume starts at step 8, after version_0's last
    assert loss.steps == list(range(12))
    history = json.loads((resumed_run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for name in ("bbox/AP", "bbox/AP50", "bbox/AR100"):
        assert series[name].values == pytest.approx([h["metrics"][name] for h in history], abs=1e-6), name
        assert series[name].epochs == [0, 1, 2]


def test_plot_writes_a_png_of_every_panel(resumed_run: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["plot", str(resumed_run)]) == 0
    out = resumed_run / "curves.png"
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 600
        assert len(image.convert("L").getcolors(1 << 16) or []) > 20  # drawn, not blank
    custom = resumed_run.parent / "pictures" / "run.png"
    assert main(["plot", str(resumed_run), "--out", str(custom)]) == 0
    assert custom.is_file() and not list(custom.parent.glob(".*.tmp"))  # atomic write leaves no temporary


def test_panels_group_losses_learning_rates_times_and_headline_metrics():
    names = ["lr-SGD/rest", "lr-SGD/backbone", "time/data", "time/step", "train/loss_cls", "train/loss",
             "bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/AP-cat", "segm/AP", "segm/AR1",
             "mIoU", "aAcc", "IoU-road", "voc/mAP", "voc/mAP75"]
    assert plot_panels(names) == [
        ("train/loss", ["train/loss"]), ("train/loss_cls", ["train/loss_cls"]),
        ("learning rate", ["lr-SGD/rest", "lr-SGD/backbone"]), ("seconds per iteration", ["time/data", "time/step"]),
        ("bbox", ["bbox/AP", "bbox/AP50", "bbox/AP75"]), ("segm", ["segm/AP"]),
        ("evaluation", ["mIoU", "aAcc"]), ("voc", ["voc/mAP", "voc/mAP75"]),
    ]


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([3.0] * 50, weight=0.9) == pytest.approx([3.0] * 50)
    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # short series are drawn as they are
    assert smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 * 1.0 / 0.75])


def test_missing_work_dir_or_logs_exit_2_naming_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path / "nowhere")])
    assert info.value.code == 2 and "nowhere" in capsys.readouterr().err
    (tmp_path / "run" / "logs").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no training logs" in err and str(tmp_path / "run") in err


def test_a_later_run_replaces_the_earlier_runs_values_from_its_first_step(tmp_path: Path):
    # version_0 logged up to step 9 but its last checkpoint was at step 6: version_1 resumes there.
    for version, steps in (("version_0", range(10)), ("version_1", range(6, 9))):
        folder = tmp_path / "logs" / version
        folder.mkdir(parents=True)
        lines = ["epoch,step,train/loss"] + [f"0,{s},{s + (0.5 if version == 'version_1' else 0.0)}" for s in steps]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    loss = read_logs(tmp_path)["train/loss"]
    assert loss.steps == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert loss.values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 7.5, 8.5]
