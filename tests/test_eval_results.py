"""`segkit eval --results` / `--show` and `segkit predict --split`: the predictions of an evaluation,
scored again by `segkit score`, give the printed numbers to the last digit; pictures of the worst and
best images. Models are untrained (random weights, score threshold 0), so every test is fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import main
from segkit.data.shapes import Shapes

MASK_HEAD = "model.roi_head.mask_head={type: MaskRCNNHead, num_convs: 1, conv_dim: 8}"
# The Shapes images under other ids: non-contiguous image ids and category ids.
IMAGE_ID = {i: 100 + 7 * i for i in range(1, 9)}
CATEGORY_ID = {1: 3, 2: 7, 3: 12}
SEG_CONFIG = """
model:
  type: EncoderDecoder
  backbone: {{type: ResNet, depth: 18, base_channels: 8}}
  neck: {{type: FPN, in_features: [c2, c3, c4, c5], out_channels: 16}}
  decode_head: {{type: EncHead, in_features: p3, channels: 16, num_codes: 4, num_classes: 4}}
data:
  batch_size: 4
  val: {{type: ShapesSegmentation, split: val, num_images: 6, image_size: 64, root: "{root}", progress: false}}
evaluation: {{type: SemSegEvaluator, main_metric: mIoU}}
trainer: {{enable_progress_bar: false, enable_model_summary: false}}
work_dir: "{work_dir}"
"""


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval_results")


@pytest.fixture(scope="module")
def coco_files(root: Path) -> tuple[Path, Path]:
    """The 8 Shapes val images of 64 px as a COCO file with ids renumbered (image 1 -> 107, category 1 -> 3, ...)
    and one object made a crowd region."""
    shapes = Shapes(split="val", num_images=8, image_size=64, root=str(root / "data"), progress=False)
    data = json.loads(Path(shapes.ann_file).read_text())
    for image in data["images"]:
        image["id"] = IMAGE_ID[image["id"]]
    for ann in data["annotations"]:
        ann["image_id"], ann["category_id"] = IMAGE_ID[ann["image_id"]], CATEGORY_ID[ann["category_id"]]
    data["annotations"][0]["iscrowd"] = 1
    for category in data["categories"]:
        category["id"] = CATEGORY_ID[category["id"]]
    ann_file = root / "renumbered.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, Path(shapes.img_dir)


def _detector(root: Path, coco_files: tuple[Path, Path], name: str, overrides: list[str]) -> Path:
    from tests.conftest import TINY_CONFIG

    ann_file, img_dir = coco_files
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(TINY_CONFIG.format(root=root / "data", work_dir=root / f"work_{name}"))
    val = f"data.val={{_delete_: true, type: CocoDataset, ann_file: '{ann_file}', img_dir: '{img_dir}', with_masks: true}}"
    cfg = segkit.load_config(cfg_path, ["model.roi_head.score_threshold=0.0", val, "trainer.num_sanity_val_steps=0",
                                        *overrides])
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    path = root / f"{name}.ckpt"
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg)),
                CLASSES_KEY: ["circle", "square", "triangle"]}, path)
    return path


@pytest.fixture(scope="module")
def box_ckpt(root: Path, coco_files: tuple[Path, Path]) -> Path:
    return _detector(root, coco_files, "boxes", ["evaluation.backend=pycocotools"])


@pytest.fixture(scope="module")
def mask_ckpt(root: Path, coco_files: tuple[Path, Path]) -> Path:
    return _detector(root, coco_files, "masks", [MASK_HEAD, "evaluation.iou_types=[bbox, segm]",
                                                 "evaluation.per_class=true"])


@pytest.fixture(scope="module")
def seg_ckpt(root: Path) -> Path:
    cfg_path = root / "seg.yaml"
    cfg_path.write_text(SEG_CONFIG.format(root=root / "data", work_dir=root / "work_seg"))
    cfg = segkit.load_config(cfg_path)
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    for module in model.modules():  # random BatchNorm statistics make the predicted classes vary
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.5, 0.5)
    path = root / "seg.ckpt"
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg)),
                CLASSES_KEY: ["background", "circle", "square", "triangle"]}, path)
    return path


def _eval_then_score(ckpt: Path, results: Path, tmp_path: Path, capsys) -> tuple[dict, dict, str]:
    code, printed, err = run(["eval", str(ckpt), "--results", str(results), "--out", str(tmp_path / "eval.json")],
                             capsys)
    assert code == 0, err
    assert f"segkit score --config {ckpt} --pred {results}" in printed
    code, scored, err = run(["score", "--config", str(ckpt), "--pred", str(results), "--out",
                             str(tmp_path / "score.json")], capsys)
    assert code == 0, err
    table = printed.split(" (val):\n", 1)[1].split("\nmetrics written")[0].rstrip()
    assert table in scored  # the same table, digit for digit
    return json.loads((tmp_path / "eval.json").read_text()), json.loads((tmp_path / "score.json").read_text()), table


def test_detector_results_keep_the_dataset_ids_and_score_to_the_eval_numbers(box_ckpt: Path, coco_files, tmp_path: Path,
                                                                             capsys):
    results = tmp_path / "r.json"
    evaluated, scored, _ = _eval_then_score(box_ckpt, results, tmp_path, capsys)
    assert scored == evaluated and len(evaluated) == 12  # exactly, every one of the 12 numbers
    records = json.loads(results.read_text())
    assert {r["image_id"] for r in records} <= set(IMAGE_ID.values())
    assert {r["category_id"] for r in records} <= set(CATEGORY_ID.values())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in records)
    # the plain ground-truth file scores them the same (every one of its images was evaluated)
    code, _, err = run(["score", "--task", "bbox", "--gt", str(coco_files[0]), "--pred", str(results), "--out",
                        str(tmp_path / "plain.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "plain.json").read_text()) == evaluated


def test_instance_results_score_boxes_and_masks_to_the_eval_numbers(mask_ckpt: Path, coco_files, tmp_path: Path,
                                                                    capsys):
    results = tmp_path / "r.json"
    evaluated, scored, table = _eval_then_score(mask_ckpt, results, tmp_path, capsys)
    assert scored == evaluated
    assert {f"{t}/{n}" for t in ("bbox", "segm") for n in ("AP", "APs", "AR100")} <= set(evaluated)
    assert "segm/AP-circle" in evaluated and "segm" in table
    record = json.loads(results.read_text())[0]
    assert set(record["segmentation"]) == {"size", "counts"} and record["segmentation"]["size"] == [64, 64]
    code, _, err = run(["score", "--task", "segm", "--gt", str(coco_files[0]), "--pred", str(results), "--backend",
                        "auto", "--per-class", "--out", str(tmp_path / "plain.json")], capsys)
    assert code == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain == {k: v for k, v in evaluated.items() if k.startswith("segm/")}


def test_trained_instance_model_scores_nonzero_mask_numbers_exactly(trained_mask_ckpt: Path, tmp_path: Path, capsys):
    overrides = ["evaluation.iou_types=[bbox, segm]", "evaluation.backend=pycocotools"]
    results, evaluated_file, scored_file = tmp_path / "r.json", tmp_path / "e.json", tmp_path / "s.json"
    code, _, err = run(["eval", str(trained_mask_ckpt), *overrides, "--results", str(results), "--out",
                        str(evaluated_file)], capsys)
    assert code == 0, err
    code, _, err = run(["score", "--config", str(trained_mask_ckpt), "--override", *overrides, "--pred", str(results),
                        "--out", str(scored_file)], capsys)
    assert code == 0, err
    evaluated, scored = json.loads(evaluated_file.read_text()), json.loads(scored_file.read_text())
    assert scored == evaluated and len(evaluated) == 24
    assert evaluated["segm/AP50"] > 0 and evaluated["bbox/AP50"] > 0  # a non-degenerate comparison

def test_semantic_label_maps_score_to_the_eval_numbers(seg_ckpt: Path, tmp_path: Path, capsys):
    results = tmp_path / "labels"
    evaluated, scored, _ = _eval_then_score(seg_ckpt, results, tmp_path, capsys)
    assert scored.keys() == evaluated.keys() and "IoU-circle" in scored
    assert all(scored[k] == evaluated[k] or (np.isnan(scored[k]) and np.isnan(evaluated[k])) for k in evaluated)
    files = sorted(p.name for p in results.iterdir())
    assert files == [f"{i:06d}.png" for i in range(1, 7)]  # named after the image files
    # the dataset's label folder, scored with the plain options, gives the same numbers
    label_dir = next((seg_ckpt.parent / "data").rglob("labels/val"))
    code, _, err = run(["score", "--task", "semseg", "--gt", str(label_dir), "--pred", str(results), "--num-classes",
                        "4", "--classes", "background,circle,square,triangle", "--out", str(tmp_path / "p.json")],
                       capsys)
    assert code == 0, err
    plain = json.loads((tmp_path / "p.json").read_text())
    assert all(plain[k] == evaluated[k] or (np.isnan(plain[k]) and np.isnan(evaluated[k])) for k in evaluated)


def test_predict_on_a_split_writes_the_dataset_ids_and_scores(box_ckpt: Path, tmp_path: Path, capsys):
    out = tmp_path / "pred"
    code, _, err = run(["predict", str(box_ckpt), "--split", "val", "--out", str(out), "--score-thr", "0"], capsys)
    assert code == 0, err
    records = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in records} == set(IMAGE_ID.values())
    assert {r["category_id"] for r in records} <= set(CATEGORY_ID.values())
    code, printed, err = run(["score", "--config", str(box_ckpt), "--pred", str(out / "predictions.json")], capsys)
    assert code == 0, err
    assert "AP50" in printed


def test_show_draws_the_worst_and_best_images_side_by_side(mask_ckpt: Path, seg_ckpt: Path, tmp_path: Path, capsys):
    for ckpt, name in ((mask_ckpt, r"\d+"), (seg_ckpt, r"\d{6}")):
        show = tmp_path / ckpt.stem
        code, printed, err = run(["eval", str(ckpt), "--show", str(show), "--show-count", "2"], capsys)
        assert code == 0, err
        files = sorted(p.name for p in show.iterdir())
        assert len(files) == 4, files
        assert [f.split("_")[:2] for f in files] == [["best", "001"], ["best", "002"], ["worst", "001"], ["worst", "002"]]
        assert all(re.fullmatch(rf"(best|worst)_00[12]_[01]\.\d{{3}}_{name}\.png", f) for f in files), files
        worst = [float(f.split("_")[2]) for f in files if f.startswith("worst")]
        best = [float(f.split("_")[2]) for f in files if f.startswith("best")]
        assert worst == sorted(worst) and best == sorted(best, reverse=True) and max(worst) <= min(best)
        width, height = Image.open(show / files[0]).size
        assert 2 * 64 <= width <= 2 * 64 + 8 and 64 <= height <= 64 + 32  # ground truth | prediction, a caption


def test_results_path_that_cannot_be_written_exits_2_naming_it(box_ckpt: Path, seg_ckpt: Path, tmp_path: Path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, _, err = run(["eval", str(box_ckpt), "--results", str(folder)], capsys)
    joined = " ".join(err.split())
    assert code == 2 and f"--results '{folder}' is a folder" in joined and "Traceback" not in err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(["eval", str(box_ckpt), "--results", str(blocker / "r.json")], capsys)
    assert code == 2 and str(blocker) in " ".join(err.split())
    code, _, err = run(["eval", str(seg_ckpt), "--results", str(blocker)], capsys)
    assert code == 2 and f"--results '{blocker}' is a file" in " ".join(err.split())


def test_semantic_predictions_survive_the_merge_of_distributed_states():
    from segkit.evaluation.semseg import SemSegEvaluator

    class Data:
        classes = ("a", "b", "c")

    def evaluator() -> SemSegEvaluator:
        result = SemSegEvaluator(dataset=Data())
        result.keep_predictions = True
        return result

    rng = np.random.default_rng(0)
    batches = [({"image_id": i, "file_name": f"dir/img{i}.jpg", "sem_seg": torch.from_numpy(rng.integers(0, 3, (5, 6)))},
                {"sem_seg": torch.from_numpy(rng.random((3, 5, 6)))}) for i in range(4)]
    rank0, rank1, single = evaluator(), evaluator(), evaluator()
    for i, (target, output) in enumerate(batches):
        (rank0 if i % 2 else rank1).process([target], [output])
        single.process([target], [output])
    rank1.process([batches[1][0]], [batches[1][1]])  # a padding duplicate
    rank0.merge([rank0.state(), rank1.state()])
    assert rank0.evaluate() == single.evaluate()
    assert [rank0.image_name(i) for i in range(4)] == [f"dir_img{i}" for i in range(4)]
    assert all(rank0._prediction(i) == single._prediction(i) for i in range(4))


def test_usage_errors_of_score_predict_and_show_exit_2(box_ckpt: Path, tmp_path: Path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    cases = [
        (["score", "--pred", "r.json"], "needs --task and --gt"),
        (["score", "--config", str(box_ckpt), "--gt", "gt.json", "--pred", "r.json"], "either with --gt or with --config"),
        (["score", "--config", str(box_ckpt), "--split", "train", "--pred", "r.json"], "val or test"),
        (["predict", str(box_ckpt), str(image), "--split", "val", "--out", str(tmp_path / "p")], "not both"),
        (["eval", str(box_ckpt), "--show", str(tmp_path / "s"), "--show-count", "0"], "--show-count must be"),
    ]
    for args, message in cases:
        code, _, err = run(args, capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)


@pytest.mark.slow
def test_ddp_evaluation_writes_the_results_of_every_rank_once(mask_ckpt: Path, seg_ckpt: Path, tmp_path: Path):
    import subprocess
    import sys

    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]
    # 5 label-map images over 2 processes: the sampler pads with a duplicate that must be written once
    for ckpt, overrides, results in ((mask_ckpt, [], tmp_path / "r.json"),
                                     (seg_ckpt, ["data.val.num_images=5"], tmp_path / "labels")):
        single, multi = tmp_path / f"{ckpt.stem}_1.json", tmp_path / f"{ckpt.stem}_2.json"
        assert main(["eval", str(ckpt), *overrides, "--out", str(single)]) == 0
        done = subprocess.run([sys.executable, "-m", "segkit.cli", "eval", str(ckpt), *overrides, *ddp, "--results",
                               str(results), "--out", str(multi)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("results written to") == 1  # by rank 0
        scored = tmp_path / f"{ckpt.stem}_score.json"
        args = ["score", "--config", str(ckpt), *(["--override", *overrides] if overrides else []), "--pred",
                str(results), "--out", str(scored)]
        assert main(args) == 0
        one, two, three = (json.loads(p.read_text()) for p in (single, multi, scored))
        assert one.keys() == two.keys() == three.keys()
        for key in one:
            assert one[key] == pytest.approx(two[key], abs=1e-12, nan_ok=True), key
            assert three[key] == two[key] or (np.isnan(three[key]) and np.isnan(two[key])), key
    assert len(list((tmp_path / "labels").iterdir())) == 5
