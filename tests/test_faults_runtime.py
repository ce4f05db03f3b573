"""Runtime faults met for real: models with no proposal or with overflowing outputs, checkpoints with
non-finite weights, a diverging run, a full disk (a small tmpfs), read-only file systems, folders and
files in the way, a real SIGTERM, and resuming with another config. Each ends with one clear message
(exit status 2 on the command line) or a documented recovery, and leaves every file intact."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import segkit
from segkit.cli import main
from segkit.config import load_config
from segkit.engine import runner
from tests.conftest import TINY_CONFIG

QUICK = ["trainer.limit_train_batches=1", "trainer.check_val_every_n_epoch=100"]


# ------------------------------------------------------------------------------------------- helpers
def _run(argv: list[str]) -> tuple[Any, str]:
    """Run the command line in this process: (exit status, stderr). An exception that escapes is a failure
    of the property under test, so it is returned as the status, named."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status: Any = main(argv)
        except SystemExit as exc:
            status = exc.code
        except Exception as exc:  # noqa: BLE001 - reported by the assertions
            status = f"{type(exc).__name__}: {exc}"
    return status, err.getvalue()


def _message(err: str) -> str:
    """The error paragraph, unwrapped."""
    return " ".join(err[err.index("segkit: error: "):].split("(run with --debug")[0].split())


def _assert_clean_exit_2(status: Any, err: str, *fragments: str) -> None:
    report = f"status {status!r}\nstderr:\n{err[-3000:]}"
    assert status == 2, report
    assert "Traceback" not in err, report
    message = _message(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny detector trained for one step: its config, data, work_dir and training checkpoint."""
    root = tmp_path_factory.mktemp("runtime")
    cfg = root / "tiny.yaml"
    cfg.write_text(textwrap.dedent(TINY_CONFIG.format(root=root / "data", work_dir=root / "work")))
    runner.train(load_config(cfg, ["trainer.max_epochs=1", *QUICK]))
    images = root / "images"
    images.mkdir()
    for path in sorted((root / "data").glob("shapes/*/images/val/*.png"))[:2]:
        shutil.copy(path, images / path.name)
    return {"root": root, "cfg": cfg, "ckpt": root / "work" / "checkpoints" / "last.ckpt", "images": images}


@pytest.fixture(scope="module")
def nan_ckpt(run: dict[str, Path]) -> Path:
    """The training checkpoint of ``run`` with every floating-point tensor set to NaN, as a diverged run leaves it."""
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    for value in ckpt["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    path = run["root"] / "nan.ckpt"
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------ models without proposals, overflowing outputs
DETECTOR = {
    "type": "TwoStageDetector",
    "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
    "neck": {"type": "FPN", "out_channels": 16},
    "rpn_head": {"type": "RPN", "anchor_sizes": [[16], [32], [64], [128], [256]], "post_nms_top_n_test": 50},
    "roi_head": {"type": "StandardRoIHead", "num_classes": 3, "box_head": {"type": "TwoFCHead", "fc_dim": 32}},
}
MASK_HEAD = {"type": "MaskRCNNHead", "num_convs": 1, "conv_dim": 8}
PANET = {"neck": {"type": "PAFPN", "out_channels": 16},
         "box_head": {"type": "AFPTwoFCHead", "fc_dim": 32},
         "mask_head": {"type": "PANetMaskHead", "num_convs": 3, "conv_dim": 8, "fused": True}}


def _detector(kind: str, **rpn: Any) -> torch.nn.Module:
    cfg = copy.deepcopy(DETECTOR)
    cfg["rpn_head"].update(rpn)
    if kind == "mask":
        cfg["roi_head"]["mask_head"] = MASK_HEAD
    if kind == "panet":
        cfg["neck"] = PANET["neck"]
        cfg["roi_head"].update(box_head=PANET["box_head"], mask_head=PANET["mask_head"])
    torch.manual_seed(0)
    return segkit.build_model({"model": cfg})


IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(2))]


@pytest.mark.parametrize("kind", ["faster", "mask", "panet"])
def test_a_detector_whose_rpn_removes_every_box_returns_empty_detections(kind: str):
    model = _detector(kind, min_box_size=1e9).eval()  # every proposal is smaller than that
    with torch.no_grad():
        outputs = model(IMAGES)
    for output, image in zip(outputs, IMAGES):
        assert output["boxes"].shape == (0, 4) and output["labels"].shape == (0,) and output["scores"].shape == (0,)
        if kind != "faster":
            assert output["masks"].shape == (0, 1, *image.shape[-2:])


@pytest.mark.parametrize("kind", ["faster", "mask", "panet"])
def test_a_detector_with_nan_weights_returns_empty_detections(kind: str):
    model = _detector(kind).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.fill_(float("nan"))  # every score and box is NaN
        outputs = model(IMAGES)
    assert [len(output["boxes"]) for output in outputs] == [0, 0]
    assert all(output["boxes"].shape == (0, 4) and output["scores"].shape == (0,) for output in outputs)


@pytest.mark.parametrize("kind", ["faster", "mask", "panet"])
def test_a_training_batch_without_any_roi_gives_zero_box_losses(kind: str):
    model = _detector(kind, min_box_size=1e9).train()  # no proposal, and no ground truth to add
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, *image.shape[-2:], dtype=torch.uint8)} for image in IMAGES]
    losses = model(IMAGES, targets)
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()  # every head still takes part in the graph


@pytest.mark.parametrize("kind, layer", [("mask", "roi_heads.mask_head.predictor.bias"),
                                         ("panet", "roi_heads.mask_head.fc.bias")])
def test_mask_probabilities_that_overflow_to_nan_are_pasted_as_zero(kind: str, layer: str):
    model = _detector(kind).eval()
    model.roi_heads.score_threshold = 0.0
    with torch.no_grad():
        model.get_parameter(layer).fill_(float("nan"))
        outputs = model(IMAGES)
    assert len(outputs[0]["boxes"]) > 0
    assert all(torch.isfinite(output["masks"]).all() for output in outputs)


@pytest.mark.parametrize("decode_head", [
    {"type": "FCNHead", "in_features": "c5", "channels": 16, "num_classes": 4},
    {"type": "EncHead", "in_features": "p3", "channels": 16, "num_codes": 4, "num_classes": 4},
], ids=["fcn", "encnet"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_segmentor_whose_logits_overflow_gives_finite_class_scores(decode_head: dict, value: float):
    cfg = {"type": "EncoderDecoder", "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8},
           "decode_head": decode_head}
    if decode_head["type"] == "EncHead":
        cfg["neck"] = {"type": "FPN", "in_features": ["c2", "c3", "c4", "c5"], "out_channels": 16}
    model = segkit.build_model({"model": cfg}).eval()
    with torch.no_grad():
        for name, parameter in model.decode_head.named_parameters():
            if name.endswith("bias"):
                parameter.fill_(value)
        outputs = model(IMAGES)
    for output, image in zip(outputs, IMAGES):
        scores = output["sem_seg"]
        assert scores.shape == (4, *image.shape[-2:]) and torch.isfinite(scores).all()
        assert torch.allclose(scores.sum(0), torch.ones(()))


# ------------------------------------------------------------------ checkpoints with non-finite weights
@pytest.mark.parametrize("command", ["eval", "predict", "export", "cam", "resume", "load_from"])
def test_every_tool_refuses_a_checkpoint_with_nonfinite_weights_naming_the_file_and_tensors(
        run: dict[str, Path], nan_ckpt: Path, command: str, tmp_path: Path):
    argv = {
        "eval": ["eval", str(nan_ckpt)],
        "predict": ["predict", str(nan_ckpt), str(run["images"]), "--out", str(tmp_path / "out")],
        "export": ["export", str(nan_ckpt), "--out", str(tmp_path / "model.pt"), "--images", str(run["images"])],
        "cam": ["cam", str(nan_ckpt), str(run["images"]), "--out", str(tmp_path / "out")],
        "resume": ["train", str(run["cfg"]), f"work_dir={tmp_path / 'work'}", "--resume", str(nan_ckpt)],
        "load_from": ["train", str(run["cfg"]), f"work_dir={tmp_path / 'work'}", f"engine.load_from={nan_ckpt}"],
    }[command]
    status, err = _run(argv)
    _assert_clean_exit_2(status, err, f"'{nan_ckpt}'", "not finite (NaN or infinity)", "backbone.conv1.weight",
                         "lower optimizer.lr")
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.pt").exists()


def test_a_diverging_run_evaluates_then_stops_with_the_message_and_keeps_its_last_good_checkpoint(
        run: dict[str, Path], tmp_path: Path):
    # AdamW moves every weight by about lr per step: after one step of lr 1e6 the model's outputs overflow
    # (no proposal survives), later losses are not finite.
    work = tmp_path / "work"
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        status, err = _run(["train", str(run["cfg"]), f"work_dir={work}", "optimizer.lr=1.0e+6",
                            "trainer.max_epochs=3", "trainer.limit_val_batches=1", "engine.max_nonfinite_steps=4"])
    _assert_clean_exit_2(status, err, "4 step(s) in a row had a non-finite loss", "lower optimizer.lr")
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["epoch"] == 0 and metrics["bbox/AP"] == 0.0  # evaluated: no detection, AP 0
    last = torch.load(work / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_weights_that_overflow_are_never_written_to_a_checkpoint(run: dict[str, Path], tmp_path: Path):
    # SGD with lr 1e39: the first update turns the weights into infinities (the gradients were finite).
    work = tmp_path / "work"
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        status, err = _run(["train", str(run["cfg"]), f"work_dir={work}", "optimizer.type=SGD",
                            "optimizer.lr=1.0e+39", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=100"])
    _assert_clean_exit_2(status, err, "the weights hold NaN or infinity in", str(work / "checkpoints" / "last.ckpt"),
                         "was not written")
    assert not (work / "checkpoints").exists() or not list((work / "checkpoints").iterdir())


def test_a_skipped_step_leaves_the_batchnorm_statistics_as_they_were(run: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    from segkit.models.two_stage import TwoStageDetector

    forward, calls, seen = TwoStageDetector.forward, [0], {}

    def overflowing(self, images, targets=None):
        if self.training:
            calls[0] += 1
            if calls[0] == 2:  # this batch's activations overflow: the running statistics meet NaN
                seen["before"] = {k: v.clone() for k, v in self.state_dict().items() if "running" in k}
                images = [image * float("inf") for image in images]
        return forward(self, images, targets)

    monkeypatch.setattr(TwoStageDetector, "forward", overflowing)
    cfg = load_config(run["cfg"], [f"work_dir={tmp_path / 'work'}", "trainer.max_epochs=1",
                                   "trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=100"])
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        runner.train(cfg)
    state = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    after = {k[len("model."):]: v for k, v in state["state_dict"].items() if "running" in k}
    assert seen["before"] and all(torch.equal(after[k], v) for k, v in seen["before"].items())


# ------------------------------------------------------------------ resuming with another config
def test_resume_with_another_model_or_optimizer_names_each_key_and_both_values_before_training(
        run: dict[str, Path], tmp_path: Path):
    work = tmp_path / "work"
    status, err = _run(["train", str(run["cfg"]), f"work_dir={work}", "model.roi_head.num_classes=5",
                        "optimizer.type=SGD", "model.neck.out_channels=32", "--resume", str(run["ckpt"])])
    _assert_clean_exit_2(status, err, f"cannot resume from '{run['ckpt']}'", "3 key(s)",
                         "model.neck.out_channels: 16 in the checkpoint, 32 now",
                         "model.roi_head.num_classes: 3 in the checkpoint, 5 now",
                         "optimizer.type: 'AdamW' in the checkpoint, 'SGD' now", "engine.load_from=")
    assert not work.exists()  # refused before anything was built or written


def test_resume_accepts_changes_that_leave_the_saved_state_valid(run: dict[str, Path]):
    from segkit.checkpoint import check_resumable

    cfg = load_config(run["cfg"], ["trainer.max_epochs=5", "data.num_workers=2", "data.batch_size=2",
                                   "model.backbone.pretrained=/elsewhere/r18.pth", "evaluation.main_metric=bbox/AP50"])
    assert check_resumable(run["ckpt"], cfg.to_dict()).startswith(f"resuming from {run['ckpt']}")


# ------------------------------------------------------------------ folders and files in the way
def test_a_work_dir_that_is_a_file_or_under_a_file_is_named(run: dict[str, Path], tmp_path: Path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    for work_dir in (blocker, blocker / "run"):
        status, err = _run(["train", str(run["cfg"]), f"work_dir={work_dir}"])
        _assert_clean_exit_2(status, err, f"work_dir '{work_dir}' cannot hold the run",
                             f"'{blocker}' is a file, not a folder", "set work_dir")
    assert blocker.read_text() == "not a folder"


def test_segkit_data_that_is_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from segkit.data.shapes import Shapes

    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SEGKIT_DATA", str(blocker))
    with pytest.raises(segkit.errors.UserError, match=r"cannot generate the Shapes data under .*data' "
                                                      r"\(\$SEGKIT_DATA cache folder\): .* is a file, not a folder"):
        Shapes(split="train", num_images=2, image_size=64, progress=False)


@pytest.mark.parametrize("command", ["eval", "score", "predict", "export"])
def test_an_output_path_of_the_wrong_kind_is_named(run: dict[str, Path], tmp_path: Path, command: str):
    folder, file = tmp_path / "a_folder", tmp_path / "a_file"
    folder.mkdir()
    file.write_text("kept")
    out, expected = (file, f"'{file}' is a file") if command == "predict" else (folder, f"'{folder}' is a folder")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9}]))
    argv = {"eval": ["eval", str(run["ckpt"]), "trainer.limit_val_batches=1", "--out", str(out)],
            "score": ["score", "--task", "bbox", "--gt", str(_val_annotations(run)), "--pred", str(results),
                      "--out", str(out)],
            "predict": ["predict", str(run["ckpt"]), str(run["images"]), "--out", str(out)],
            "export": ["export", str(run["ckpt"]), "--images", str(run["images"]), "--out", str(out)]}[command]
    status, err = _run(argv)
    _assert_clean_exit_2(status, err, str(out), expected)
    assert file.read_text() == "kept" and list(folder.iterdir()) == []


def _val_annotations(run: dict[str, Path]) -> Path:
    return sorted((run["root"] / "data").glob("shapes/*/annotations/instances_val.json"))[0]


def _run_as_nobody(argv: list[str]) -> tuple[Any, str]:
    """:func:`_run` in a forked child that runs as the unprivileged user 'nobody' when this process is root
    (for whom permissions do not stop writes); (exit status, stderr) come back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            signal.alarm(120)  # a child that hangs dies instead of holding the test
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            status, err = _run(argv)
            os.write(write, json.dumps({"status": status, "err": err}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(answer or b'{"status": "the child died", "err": ""}')
    return result["status"], result["err"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges in a child")
def test_a_work_dir_without_write_permission_is_named(run: dict[str, Path]):
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="segkit-perm-"))  # pytest's folders are private to their owner
    try:
        locked = shared / "locked"
        locked.mkdir()
        cfg = shared / "tiny.yaml"
        shutil.copy(run["cfg"], cfg)
        shared.chmod(0o755)
        cfg.chmod(0o644)
        locked.chmod(0o555)
        status, err = _run_as_nobody(["train", str(cfg), f"work_dir={locked / 'run'}"])
        _assert_clean_exit_2(status, err, f"work_dir '{locked / 'run'}' cannot hold the run", "permission denied")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------ a real full disk, a real read-only file system
# Runs inside `unshare -rm` (new user and mount namespaces: the test's own tmpfs mounts, invisible outside).
FILE_SYSTEM_FAULTS = r'''
import contextlib, errno, io, json, os, shutil, subprocess, sys
from segkit.cli import main

args = json.loads(sys.argv[1])
root, cfg, ckpt, images = args["root"], args["cfg"], args["ckpt"], args["images"]
report = {}


def mount(path, size="4m"):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)


def fill(path):
    with open(os.path.join(path, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def listing(path):
    return sorted(os.listdir(path))


def run(name, argv, **extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
        except BaseException as exc:
            status = f"{type(exc).__name__}: {exc}"
    report[name] = {"status": status, "err": err.getvalue(), **extra}
    with open(args["report"], "w") as f:  # kept up to date: a crash still leaves the cases before it
        json.dump(report, f)


def extra_of(name, **values):
    report[name].update(values)
    with open(args["report"], "w") as f:
        json.dump(report, f)


quick = ["trainer.limit_train_batches=1", "trainer.check_val_every_n_epoch=100"]

# a checkpoint: the run's last.ckpt on a full file system, resumed for one more epoch
work = os.path.join(root, "full_ckpt")
shutil.copytree(os.path.dirname(os.path.dirname(ckpt)), work, ignore=shutil.ignore_patterns("checkpoints"))
mount(os.path.join(work, "checkpoints"))
shutil.copy(ckpt, os.path.join(work, "checkpoints", "last.ckpt"))
fill(os.path.join(work, "checkpoints"))
run("checkpoint", ["train", cfg, f"work_dir={work}", "trainer.max_epochs=2", *quick, "--resume", "auto"])
extra_of("checkpoint", same=open(ckpt, "rb").read() == open(os.path.join(work, "checkpoints", "last.ckpt"), "rb").read(),
         files=listing(os.path.join(work, "checkpoints")))

# config.yaml of a run whose work_dir is full
work = os.path.join(root, "full_work")
mount(work)
with open(os.path.join(work, "config.yaml"), "w") as f:
    f.write("the previous config\n")
fill(work)
run("config", ["train", cfg, f"work_dir={work}", "trainer.max_epochs=1", *quick])
extra_of("config", text=open(os.path.join(work, "config.yaml")).read(), files=listing(work))

# the training logs on a full file system
work = os.path.join(root, "full_logs")
mount(os.path.join(work, "logs"))
fill(os.path.join(work, "logs"))
run("logs", ["train", cfg, f"work_dir={work}", "trainer.max_epochs=1", *quick])

# the outputs of eval, predict and export on a full file system
out = os.path.join(root, "full_out")
mount(out)
with open(os.path.join(out, "metrics.json"), "w") as f:
    f.write("{}\n")
fill(out)
run("eval_out", ["eval", ckpt, "trainer.limit_val_batches=1", "--out", os.path.join(out, "metrics.json")])
run("predict_out", ["predict", ckpt, images, "--out", os.path.join(out, "pred")])
extra_of("eval_out", text=open(os.path.join(out, "metrics.json")).read(), files=listing(out))

# a read-only file system: work_dir, SEGKIT_DATA, and the outputs
ro = os.path.join(root, "ro")
mount(ro)
os.makedirs(os.path.join(ro, "work"))
os.makedirs(os.path.join(ro, "pred"))  # an output folder that exists: the pictures are what cannot be written
subprocess.run(["mount", "-o", "remount,ro", ro], check=True)
run("ro_work_dir", ["train", cfg, f"work_dir={os.path.join(ro, 'work')}"])
os.environ["SEGKIT_DATA"] = os.path.join(ro, "data")
run("ro_data", ["train", cfg, f"work_dir={os.path.join(root, 'data_run')}", "data.train.root=null"])
del os.environ["SEGKIT_DATA"]
run("ro_eval_out", ["eval", ckpt, "trainer.limit_val_batches=1", "--out", os.path.join(ro, "metrics.json")])
run("ro_predict_out", ["predict", ckpt, images, "--out", os.path.join(ro, "pred")])
run("ro_score_out", ["score", "--task", "bbox", "--gt", args["gt"], "--pred", args["results"],
                     "--out", os.path.join(ro, "scores.json")])
run("ro_export_out", ["export", ckpt, "--images", images, "--out", os.path.join(ro, "model.pt")])

# last, as it used to abort the process: torch.jit.save of an export on a full file system
run("export_out", ["export", ckpt, "--images", images, "--out", os.path.join(out, "model.pt")])
extra_of("export_out", files=listing(out))
'''


def _can_mount_in_a_namespace() -> str | None:
    """Why the test cannot make its own file systems here, or None when it can."""
    if not shutil.which("unshare"):
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"user and mount namespaces are not available ({probe.stderr.strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def file_system_faults(run: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Every case of FILE_SYSTEM_FAULTS, run once in its own namespace with small tmpfs file systems."""
    reason = _can_mount_in_a_namespace()
    if reason is not None:
        pytest.skip(f"needs a real full / read-only file system: {reason}")
    root = run["root"] / "fs"
    root.mkdir()
    gt = _val_annotations(run)
    results = root / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9}]))
    args = {"root": str(root), "cfg": str(run["cfg"]), "ckpt": str(run["ckpt"]), "images": str(run["images"]),
            "gt": str(gt), "results": str(results), "report": str(root / "report.json")}
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FILE_SYSTEM_FAULTS, json.dumps(args)],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((root / "report.json").read_text()) if (root / "report.json").exists() else {}
    report["process"] = {"status": done.returncode, "err": done.stderr[-3000:]}
    return report


def _case(report: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    assert name in report, f"the case did not run; the process ended with {report['process']}"
    return report[name]


def test_a_checkpoint_on_a_full_disk_exits_2_and_keeps_the_previous_one(file_system_faults):
    case = _case(file_system_faults, "checkpoint")
    _assert_clean_exit_2(case["status"], case["err"], "cannot write the checkpoint", "last.ckpt",
                         "no space left on the device", "The previous file is intact", "--resume auto")
    assert case["same"] and case["files"] == ["filler", "last.ckpt"]  # no temporary file left


def test_the_run_s_config_on_a_full_disk_exits_2_and_keeps_the_previous_one(file_system_faults):
    case = _case(file_system_faults, "config")
    _assert_clean_exit_2(case["status"], case["err"], "config.yaml", "no space left on the device")
    assert case["text"] == "the previous config\n" and case["files"] == [".segkit.lock", "config.yaml", "filler"]


def test_the_training_logs_on_a_full_disk_exit_2_naming_them(file_system_faults):
    case = _case(file_system_faults, "logs")
    _assert_clean_exit_2(case["status"], case["err"], "cannot write the training log", "/logs",
                         "no space left on the device")


@pytest.mark.parametrize("name, fragment", [("eval_out", "metrics.json"), ("predict_out", "/pred"),
                                            ("export_out", "model.pt")])
def test_outputs_on_a_full_disk_exit_2_naming_the_file(file_system_faults, name: str, fragment: str):
    case = _case(file_system_faults, name)
    _assert_clean_exit_2(case["status"], case["err"], fragment, "no space left on the device")
    if name == "eval_out":
        assert case["text"] == "{}\n"
    if "files" in case:
        assert not [f for f in case["files"] if f.endswith(".tmp")]


@pytest.mark.parametrize("name, fragment", [
    ("ro_work_dir", "work_dir '"), ("ro_data", "cannot generate the Shapes data"), ("ro_eval_out", "metrics.json"),
    ("ro_predict_out", "/pred"), ("ro_score_out", "scores.json"), ("ro_export_out", "model.pt")])
def test_a_read_only_file_system_exits_2_naming_the_path(file_system_faults, name: str, fragment: str):
    case = _case(file_system_faults, name)
    _assert_clean_exit_2(case["status"], case["err"], fragment, "read-only")


# ------------------------------------------------------------------ SIGTERM from a cluster scheduler
def test_sigterm_to_the_job_saves_the_state_and_exits_non_zero_like_ctrl_c(run: dict[str, Path], tmp_path: Path):
    work = tmp_path / "work"
    # SLURM's scancel signals every process of the job, the data-loading workers included.
    proc = subprocess.Popen([sys.executable, "-m", "segkit.cli", "train", str(run["cfg"]), f"work_dir={work}",
                             "trainer.max_epochs=1000", "engine.checkpoint_every_n_steps=1", "data.num_workers=1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = work / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    report = f"exit status {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert proc.returncode == 128 + signal.SIGTERM, report
    assert "training stopped by SIGTERM" in out and "--resume" in out, report
    assert "Traceback" not in err, report
    state = torch.load(work / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] > 0 and "state_dict" in state
    torch.load(last, map_location="cpu", weights_only=True)  # intact
    assert not [p.name for p in last.parent.iterdir() if ".tmp" in p.name]

