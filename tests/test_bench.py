"""`segkit bench`: the JSON report's keys and values, torchvision comparisons, user errors (never timings)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import segkit
from segkit.bench import REFERENCES, comparison_ratios, reference_for
from segkit.cli import main
from segkit.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MEASURED = ("train_step_s", "infer_s", "throughput_batch_s")
ENTRY_KEYS = {f"{key}{suffix}" for key in ("train_step", "infer", "throughput_batch")
              for suffix in ("_s", "_min_s", "_max_s", "_all_s")} | {
    "throughput_img_s", "peak_mem_mb", "infer_peak_mem_mb", "train_loss_finite", "params_m"}
DATA_KEYS = {"data_img_s", "data_first_batch_s", "data_batches", "data_images", "data_workers"}
EVAL_KEYS = {"eval_s", "eval_process_s", "eval_evaluate_s", "eval_images", "eval_model_s"}
TOP_KEYS = {"config", "model", "compare", "reference_model", "same_weights", "device", "threads", "cpu", "cpu_count",
            "versions", "inputs", "image_size", "batch_size", "iters", "warmup", "adjustments", "skipped",
            "memory_method", "segkit", "reference", "ratio_train_step", "ratio_infer", "ratio_throughput",
            "ratio_peak_mem"}


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """`--threads` sets torch's process-wide thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    # One thread: on a busy machine, threads waiting for each other would make these runs many times slower.
    assert main(["bench", *args, "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    return report, capsys.readouterr().out


def check_entry(entry: dict, batch_size: int, iters: int) -> None:
    assert ENTRY_KEYS <= set(entry)
    for key in MEASURED:
        base = key[:-2]
        values = entry[f"{base}_all_s"]
        assert len(values) == iters and all(v > 0 for v in values)
        assert entry[f"{base}_min_s"] <= entry[key] <= entry[f"{base}_max_s"]
    assert math.isclose(entry["throughput_img_s"], batch_size / entry["throughput_batch_s"])
    assert entry["params_m"] > 0 and entry["train_loss_finite"] is True


def check_run(report: dict, *, batch_size: int, iters: int) -> None:
    assert set(report) == TOP_KEYS
    assert report["batch_size"] == batch_size and report["iters"] == iters and report["threads"] >= 1
    assert report["device"] == "cpu"
    versions = report["versions"]
    assert versions["segkit"] == segkit.__version__ and versions["torch"] and versions["torchvision"]
    check_entry(report["segkit"], batch_size, iters)
    if not report["memory_method"].startswith("unavailable"):
        assert report["segkit"]["peak_mem_mb"] > 0  # the gradients alone take memory


def test_tiny_detector_reports_every_phase_with_synthetic_images(tiny_config: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    report, out = bench([str(tiny_config), "--iters", "2", "--warmup", "1", "--batch-size", "2",
                         "--image-size", "64x64"], tmp_path / "f.json", capsys)
    check_run(report, batch_size=2, iters=2)
    assert report["image_size"] == [64, 64] and report["inputs"] == "synthetic 64x64"
    assert report["skipped"] == {} and report["reference"] is None and report["ratio_train_step"] is None
    ours = report["segkit"]
    assert DATA_KEYS | EVAL_KEYS <= set(ours)
    assert ours["data_img_s"] > 0 and ours["data_images"] == 2 * ours["data_batches"] and ours["data_workers"] == 0
    assert ours["eval_images"] == 8 and math.isclose(ours["eval_s"], ours["eval_process_s"] + ours["eval_evaluate_s"])
    for label in ("train step (batch 2)", "inference (batch 1)", "throughput (batch 2)", "data loading", "evaluation"):
        assert label in out
    assert f"results written to {tmp_path / 'f.json'}" in out


def test_tiny_detector_uses_the_config_data_without_image_size(tiny_config: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    report, _ = bench([str(tiny_config), "--iters", "1", "--warmup", "0", "--skip", "data,eval"],
                      tmp_path / "f.json", capsys)
    check_run(report, batch_size=4, iters=1)  # data.batch_size of the config
    assert report["image_size"] is None and report["inputs"].startswith("data.train")
    assert report["skipped"] == {"data": "--skip", "eval": "--skip"}
    assert report["segkit"].get("data_img_s") is None and report["segkit"].get("eval_s") is None


def test_segmentor_reports_every_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "data"
    overrides = [f"data.{split}.{key}" for split in ("train", "val")
                 for key in ("num_images=8", f"root={root}", "progress=false")]
    report, _ = bench([str(CONFIGS / "quickstart_seg.yaml"), *overrides, "--iters", "2", "--warmup", "1",
                       "--batch-size", "2", "--image-size", "64x64"], tmp_path / "s.json", capsys)
    check_run(report, batch_size=2, iters=2)
    assert report["model"] == "EncoderDecoder" and report["skipped"] == {}
    assert report["segkit"]["eval_images"] == 8 and report["segkit"]["data_img_s"] > 0


def test_compare_torchvision_faster_rcnn_times_both_with_the_same_weights(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]):
    report, out = bench([str(CONFIGS / "faster_rcnn_r50_fpn_coco.yaml"), "model.backbone.pretrained=null",
                         "--compare", "torchvision", "--image-size", "64x64", "--iters", "1", "--warmup", "0",
                         "--batch-size", "1", "--skip", "data,eval"], tmp_path / "c.json", capsys)
    check_run(report, batch_size=1, iters=1)
    ours, ref = report["segkit"], report["reference"]
    check_entry(ref, 1, 1)
    assert report["reference_model"] == "torchvision.models.detection.fasterrcnn_resnet50_fpn"
    assert report["same_weights"] is True and ours["params_m"] == ref["params_m"]
    assert report["ratio_train_step"] == ours["train_step_s"] / ref["train_step_s"]
    assert report["ratio_infer"] == ours["infer_s"] / ref["infer_s"]
    assert report["ratio_throughput"] == ours["throughput_img_s"] / ref["throughput_img_s"]
    if ref["peak_mem_mb"]:
        assert report["ratio_peak_mem"] == ours["peak_mem_mb"] / ref["peak_mem_mb"]
    assert any("model.min_size/max_size 800/1333 -> 64/64" in note for note in report["adjustments"])
    assert "segkit/torchvision" in out and "torchvision" in out


@pytest.mark.slow  # 10-30 s; the cheaper test below covers the FCN reference without timing it
def test_compare_torchvision_fcn_matches_the_architecture_and_times_both(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]):
    report, _ = bench([str(CONFIGS / "fcn_r50_d8_voc.yaml"), "--compare", "torchvision", "--image-size", "64x64",
                       "--iters", "1", "--warmup", "0", "--batch-size", "2", "--skip", "data,eval"],
                      tmp_path / "c.json", capsys)
    check_run(report, batch_size=2, iters=1)
    check_entry(report["reference"], 2, 1)
    assert report["reference_model"] == "torchvision.models.segmentation.fcn_resnet50"
    assert report["segkit"]["params_m"] == report["reference"]["params_m"]
    notes = " ".join(report["adjustments"])
    for change in ("model.backbone.pretrained", "model.backbone.stem deep -> default",
                   "model.decode_head.num_convs 2 -> 1", "model.test_cfg -> {mode: whole}"):
        assert change in notes


def test_fcn_reference_gets_torchvision_architecture_and_weights():
    import copy

    from segkit.bench import TorchvisionSegmentor, build_reference, match_reference

    torch.set_num_threads(1)  # restored by the fixture
    cfg = copy.deepcopy(segkit.load_config(CONFIGS / "fcn_r50_d8_voc.yaml"))
    notes = match_reference("fcn_resnet50", cfg)
    assert cfg["model"]["backbone"]["stem"] == "default" and cfg["model"]["decode_head"]["num_convs"] == 1
    assert cfg["model"]["backbone"]["pretrained"] is None and len(notes) == 2
    ours = segkit.build_model(cfg)
    reference = build_reference("fcn_resnet50", cfg, ours, (64, 64), seed=0)
    assert isinstance(reference, TorchvisionSegmentor)
    ours_backbone, their_backbone = ours.backbone.state_dict(), reference.net.backbone.state_dict()
    assert ours_backbone.keys() == their_backbone.keys()
    assert all(torch.equal(value, their_backbone[key]) for key, value in ours_backbone.items())
    assert torch.equal(ours.decode_head.classifier.weight, reference.net.classifier[4].weight)
    assert torch.equal(ours.auxiliary_heads[0].convs[0][0].weight, reference.net.aux_classifier[0].weight)
    images = [torch.rand(3, 32, 40)]  # padded to 32 x 64 inside, cropped back in the output
    assert reference.eval()(images)[0]["sem_seg"].shape == (21, 32, 40)
    losses = reference.train()(images, [{"sem_seg": torch.randint(0, 21, (32, 40))}])
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())


def test_deeplabv3_reference_has_segkit_weights_and_segments_alike():
    import copy

    from segkit.bench import TorchvisionSegmentor, build_reference, match_reference

    torch.set_num_threads(1)  # restored by the fixture
    cfg = copy.deepcopy(segkit.load_config(CONFIGS / "deeplabv3_r50_d8_voc.yaml",
                                           ["model.decode_head.channels=128", "model.decode_head.dilations=[6,12,18]"]))
    notes = " ".join(match_reference("deeplabv3_resnet50", cfg))
    assert "model.decode_head.channels 128 -> 256" in notes and "model.decode_head.dilations [6, 12, 18] -> [12, 24, 36]" \
        in notes and "model.test_cfg -> {mode: whole}" in notes
    ours = segkit.build_model(cfg)
    reference = build_reference("deeplabv3_resnet50", cfg, ours, (64, 64), seed=0)
    assert isinstance(reference, TorchvisionSegmentor)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    images = [torch.rand(3, 48, 56)]
    with torch.no_grad():
        theirs = reference.eval()(images)[0]["sem_seg"]
        mine = ours.eval()(images)[0]["sem_seg"]
    assert theirs.shape == mine.shape == (21, 48, 56)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    # two images: the image-pooling branch's BatchNorm needs more than one value per channel in training
    losses = reference.train()(images * 2, [{"sem_seg": torch.randint(0, 21, (48, 56))}] * 2)
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())


def test_deeplabv3_reference_refuses_an_undilated_backbone():
    from segkit.bench import build_reference

    cfg = segkit.load_config(CONFIGS / "deeplabv3_r50_d8_voc.yaml",
                             ["model.backbone.pretrained=null", "model.backbone.strides=[1,2,2,2]",
                              "model.backbone.dilations=[1,1,1,1]"])
    with pytest.raises(UserError, match="contract_dilation=true"):
        build_reference("deeplabv3_resnet50", cfg, None, (64, 64), seed=0)


@pytest.mark.parametrize("overrides", [[], ["model.head.norm=GN", "model.head.box_loss=giou",
                                            "model.neck.extra_from=input"]], ids=["v1", "v2"])
def test_retinanet_reference_has_segkit_weights_and_detects_alike(overrides):
    import copy

    from segkit.bench import build_reference, match_reference

    torch.set_num_threads(1)  # restored by the fixture
    # fold_norm off: torchvision's order of operations, so the detections agree to the last bit.
    cfg = copy.deepcopy(segkit.load_config(CONFIGS / "retinanet_r50_fpn_coco.yaml",
                                           ["model.min_size=96", "model.max_size=128",
                                            "model.backbone.fold_norm=false", *overrides]))
    match_reference("retinanet_resnet50_fpn", cfg)
    ours = segkit.build_model(cfg).eval()
    reference = build_reference("retinanet_resnet50_fpn", cfg, ours, (96, 128), seed=0).eval()
    with torch.no_grad():  # class biases spread (the threshold chooses); the background logit scores nothing
        bias = reference.head.classification_head.cls_logits.bias.view(9, 81)
        bias.uniform_(-4.0, 0.0)
        bias[:, 0] = -40.0
    ours.load_state_dict(segkit.weights.convert_weights(reference.state_dict(), "torchvision").state_dict)
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        theirs, mine = reference(images)[0], ours(images)[0]
    assert len(mine["boxes"]) > 0
    torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=0, atol=1e-3)
    assert torch.equal(mine["labels"], theirs["labels"])


def test_compare_without_torchvision_equivalent_exits_2_listing_comparable_configs(
        tiny_config: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tiny_config), "--compare", "torchvision", "--iters", "1"])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "Traceback" not in err
    assert "no torchvision equivalent" in err and "ResNet-18" in err
    for name, reference in REFERENCES.items():
        assert name in err and reference.example_config in err


@pytest.mark.parametrize("args, message", [
    (["--skip", "data,bogus"], "unknown phase(s) bogus"),
    (["--image-size", "64by64"], "--image-size takes HxW"),
    (["--iters", "0"], "--iters must be an integer >= 1"),
])
def test_bad_options_exit_2(tiny_config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str):
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tiny_config), *args])
    assert info.value.code == 2 and message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_reference_is_found_for_its_example_config(name: str):
    cfg = segkit.load_config(CONFIGS.parent / REFERENCES[name].example_config, ["model.backbone.pretrained=null"])
    assert reference_for(cfg) == name


def test_an_atss_retinanet_is_refused_naming_the_assigner():
    from segkit.bench import build_reference

    cfg = segkit.load_config(CONFIGS / "retinanet_r50_fpn_coco.yaml", ["model.head.assigner=atss"])
    assert reference_for(cfg) == "retinanet_resnet50_fpn"
    with pytest.raises(segkit.errors.UserError, match=r"IoU-threshold matching \(assigner: max_iou\)"):
        build_reference("retinanet_resnet50_fpn", cfg, None, (128, 128), seed=0)  # refused before any model is built


def test_panet_is_not_mistaken_for_mask_rcnn():
    cfg = segkit.load_config(CONFIGS / "panet_r50_fpn_coco.yaml", ["model.backbone.pretrained=null"])
    with pytest.raises(segkit.errors.UserError, match="no torchvision equivalent"):
        reference_for(cfg)


def test_ratios_are_segkit_over_reference_and_none_where_unmeasured():
    ours = {"train_step_s": 3.0, "infer_s": 1.0, "throughput_img_s": 4.0, "peak_mem_mb": None}
    ref = {"train_step_s": 2.0, "infer_s": 0.0, "throughput_img_s": 8.0, "peak_mem_mb": 100.0}
    assert comparison_ratios(ours, ref) == {"ratio_train_step": 1.5, "ratio_infer": None, "ratio_throughput": 0.5,
                                            "ratio_peak_mem": None}
    assert set(comparison_ratios(ours, None).values()) == {None}
