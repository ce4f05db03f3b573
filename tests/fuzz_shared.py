"""The valid inputs the command-line fuzz cases start from, made once per test module.

Shapes data (detection, label maps and a VOC export of the same images), a COCO file with both polygon and RLE
masks, COCO results and VOC detection files made from the ground truth, the tiny detector and segmentor configs,
and a checkpoint of each after one training step (for ``segkit eval``). Cases only read them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from conftest import TINY_CONFIG
from fuzz_harness import Case, FuzzRunner
from fuzz_inputs import dump_yaml
from test_train_semseg import TINY_SEG_CONFIG

# overrides that bound the work of `segkit train` on a valid config: one training step, one validation batch
BOUNDED_TRAINING = ["trainer.max_steps=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "trainer.check_val_every_n_epoch=1"]


class Shared:
    """Valid inputs made once per module, read (never written) by every case."""

    def __init__(self, root: Path, runner: FuzzRunner) -> None:
        from segkit.data.semseg_formats import ShapesSegmentation
        from segkit.data.shapes import Shapes
        from segkit.data.voc import ShapesVOC

        self.root = root
        data = str(root / "data")
        train = Shapes(split="train", num_images=16, image_size=64, root=data, progress=False)
        val = Shapes(split="val", num_images=8, image_size=64, root=data, progress=False)
        seg_val = ShapesSegmentation(split="val", num_images=8, image_size=64, root=data, progress=False)
        self.train_images, self.val_images = train.img_dir, val.img_dir
        self.val_ann = val.ann_file
        self.val_labels = seg_val.instances.label_dir
        self.coco_doc = with_polygons(json.loads(Path(train.ann_file).read_text()))
        self.results_doc = results_from(val)
        self.voc_root = ShapesVOC(split="val", num_images=8, image_size=64, root=data, progress=False).voc_root
        self.voc_files = {str(p.relative_to(self.voc_root)): p.read_bytes() for p in Path(self.voc_root).rglob("*")
                          if p.is_file()}
        self.detections = detection_files(self.voc_files)
        self.det_config = yaml.safe_load(TINY_CONFIG.format(root=data, work_dir="work"))
        self.seg_config = yaml.safe_load(TINY_SEG_CONFIG.format(root=data, work_dir="work"))
        self.det_ckpt = self._train(runner, self.det_config, "det")
        self.seg_ckpt = self._train(runner, self.seg_config, "seg")

    def _train(self, runner: FuzzRunner, config: dict[str, Any], name: str) -> str:
        """A checkpoint of ``config`` after one step (for ``segkit eval``), kept under the shared folder."""
        outcome = runner.run(Case("setup", ["train", "in/c.yaml", *BOUNDED_TRAINING],
                                  {"in/c.yaml": dump_yaml(config).encode()}, keep=True))
        trained = outcome.sandbox / "work" / "checkpoints" / "last.ckpt"
        assert outcome.code == 0 and trained.is_file(), outcome.stderr[-3000:]
        ckpt = self.root / f"{name}.ckpt"
        shutil.copyfile(trained, ckpt)
        shutil.rmtree(outcome.sandbox)
        return str(ckpt)


def with_polygons(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every other annotation's mask given as a polygon (its box) instead of an RLE."""
    doc = copy.deepcopy(doc)
    for ann in doc["annotations"][::2]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return doc


def results_from(dataset: Any) -> list[dict[str, Any]]:
    """COCO results (boxes and RLE masks, slightly shifted) made from ``dataset``'s ground truth."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    results = []
    for ann in dataset.coco.dataset["annotations"]:
        mask = np.roll(dataset.coco.annToMask(ann), tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "score": round(float(rng.random()), 3), "bbox": list(ann["bbox"]),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return results


def detection_files(voc_files: dict[str, bytes]) -> dict[str, list[str]]:
    """VOC detection files (``comp4_det_val_<class>.txt`` lines) made from the ground-truth XML: every object,
    shifted by a pixel, with a score."""
    import xml.etree.ElementTree as ET

    lines: dict[str, list[str]] = {"circle": [], "square": [], "triangle": []}
    for name, content in sorted(voc_files.items()):
        if name.startswith("Annotations/"):
            for k, obj in enumerate(ET.fromstring(content).iter("object")):
                box = [int(obj.find(f"bndbox/{c}").text) for c in ("xmin", "ymin", "xmax", "ymax")]
                lines[obj.find("name").text].append(f"{Path(name).stem} {0.9 - 0.1 * (k % 5):.1f} "
                                                    f"{box[0] + 1} {box[1]} {box[2] + 1} {box[3]}")
    return lines
