"""Semantic segmentation datasets in known layouts: Pascal VOC 2012 (+ SBD), Pascal-Context, ADE20K,
Cityscapes, and the synthetic Shapes.

Each is a :class:`~segkit.data.semseg.SemSegFolder` over the dataset's usual folder layout, with
its class names in label order; the target contract is described in :mod:`segkit.data.semseg`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A

from segkit.data.coco import DatasetError
from segkit.data.semseg import SemSegFolder, read_split_file
from segkit.data.shapes import Shapes
from segkit.errors import ConfigError, did_you_mean
from segkit.registry import DATASETS

__all__ = [
    "VOCSegmentation", "PascalContext", "ADE20K", "Cityscapes", "ShapesSegmentation", "VOC_CLASSES",
    "CONTEXT_CLASSES", "ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_IDS", "CITYSCAPES_PALETTE",
]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Label order of the Detail-API conversion (values 0..59 of SegmentationClassContext).
CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse",
    "curtain", "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow",
    "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood",
)

# SceneParsing150 (ADEChallengeData2016) classes; raw label v (1..150) is ADE20K_CLASSES[v - 1].
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The 19 classes Cityscapes evaluates, in train-id order, with the label id (gtFine_labelIds.png value)
# of each and the dataset's colours; every other label id (void, and the rarely labelled classes such
# as caravan or trailer) is ignored.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
_CITYSCAPES_LABELS = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}

_Transforms = Sequence[Mapping[str, Any]] | A.Compose | None


def _split_file(folder: str, split: str, *, option: str = "split") -> str:
    """``folder/<split>.txt``; a :class:`ConfigError` listing the available splits if it is missing."""
    path = os.path.join(folder, f"{split}.txt")
    if not isinstance(split, str) or not os.path.isfile(path):
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt")) if os.path.isdir(folder) else []
        raise ConfigError(f"no split file '{path}' for split {split!r}; available splits: "
                          f"{', '.join(have) or 'none (check root)'}." + did_you_mean(str(split), have), key=option)
    return path


@DATASETS.register()
class VOCSegmentation(SemSegFolder):
    """Pascal VOC 2012 segmentation, optionally with the SBD augmented training set.

    Layout: ``root`` is the ``VOC2012`` folder with ``JPEGImages/*.jpg``, ``SegmentationClass/*.png``
    (palette PNGs: 0 background, 1..20 the classes, 255 object borders and difficult regions, ignored)
    and ``ImageSets/Segmentation/<split>.txt``. 21 classes (:data:`VOC_CLASSES`).

    ``split="train_aug"`` needs ``sbd_root``, SBD's ``dataset`` folder (``cls/<stem>.mat`` holding
    ``GTcls.Segmentation``, ``train.txt``, ``val.txt``). Its images are the union of SBD train, SBD
    val and VOC train, minus every VOC val image (10,582 images with the official files), sorted by
    name. The label of an image in VOC train is its VOC PNG (which marks borders as ignore); every
    other image takes SBD's ``.mat`` label (no ignore pixels). Images are read from ``JPEGImages``.

    Args:
        root: the ``VOC2012`` folder.
        split: ``"train"``, ``"val"``, ``"trainval"`` (any ``ImageSets/Segmentation/<split>.txt``),
            or ``"train_aug"``.
        sbd_root: SBD's ``dataset`` folder, needed by ``"train_aug"`` only.
        transforms: label-map pipeline, as in :class:`~segkit.data.semseg.SemSegFolder`.

    Example:
        >>> ds = VOCSegmentation(root="data/VOCdevkit/VOC2012", split="train_aug",
        ...                      sbd_root="data/benchmark_RELEASE/dataset")
    """

    def __init__(self, *, root: str, split: str = "train", sbd_root: str | None = None,
                 transforms: _Transforms = None) -> None:
        root = os.fspath(root)
        self.root, self.split = root, split
        img_dir, ann_dir = os.path.join(root, "JPEGImages"), os.path.join(root, "SegmentationClass")
        sets = os.path.join(root, "ImageSets", "Segmentation")
        if split != "train_aug":
            if sbd_root is not None:
                raise ConfigError(f"sbd_root is only used by split 'train_aug', not {split!r}; remove it.",
                                  key="sbd_root")
            super().__init__(img_dir=img_dir, ann_dir=ann_dir, classes=VOC_CLASSES, split=_split_file(sets, split),
                             transforms=transforms)
            return
        if sbd_root is None:
            raise ConfigError("split 'train_aug' combines VOC with SBD: set sbd_root to SBD's 'dataset' folder "
                              "(the one holding cls/, train.txt and val.txt).", key="sbd_root")
        sbd_root = os.fspath(sbd_root)
        voc_train = set(read_split_file(_split_file(sets, "train")))
        voc_val = set(read_split_file(_split_file(sets, "val")))
        sbd = set(read_split_file(os.path.join(sbd_root, "train.txt"))) | set(
            read_split_file(os.path.join(sbd_root, "val.txt")))
        stems = sorted((sbd | voc_train) - voc_val)
        samples = [(os.path.join(img_dir, f"{s}.jpg"),
                    os.path.join(ann_dir, f"{s}.png") if s in voc_train else os.path.join(sbd_root, "cls", f"{s}.mat"))
                   for s in stems]
        missing = [image for image, _ in samples if not os.path.isfile(image)]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of 'train_aug' are not in '{img_dir}': "
                               f"{', '.join(missing[:5])}. SBD's images come from VOC2011; use a complete "
                               f"VOC2012 JPEGImages folder.")
        self._setup(img_dir=img_dir, samples=samples, classes=VOC_CLASSES, transforms=transforms)


@DATASETS.register()
class PascalContext(SemSegFolder):
    """Pascal-Context in the layout of the Detail-API conversion used by MMSegmentation.

    Layout: ``root`` with ``JPEGImages/*.jpg``, ``SegmentationClassContext/*.png`` (values 0..59,
    0 = background, order of :data:`CONTEXT_CLASSES`) and
    ``ImageSets/SegmentationContext/{train,val}.txt``.

    By default background is ignored and the 59 object/stuff classes are labelled ``0..58``
    (``reduce_zero_label``), the "59 classes" setting of EncNet's results; ``include_background``
    keeps background as class 0 of 60.

    Args:
        root: the dataset folder.
        split: ``"train"`` or ``"val"`` (any ``ImageSets/SegmentationContext/<split>.txt``).
        include_background: 60 classes with background, instead of 59 without.
        transforms: label-map pipeline, as in :class:`~segkit.data.semseg.SemSegFolder`.

    Example:
        >>> ds = PascalContext(root="data/VOCdevkit/VOC2010", split="val")
        >>> ds.num_classes
        59
    """

    def __init__(self, *, root: str, split: str = "train", include_background: bool = False,
                 transforms: _Transforms = None) -> None:
        root = os.fspath(root)
        self.root, self.split = root, split
        super().__init__(
            img_dir=os.path.join(root, "JPEGImages"),
            ann_dir=os.path.join(root, "SegmentationClassContext"),
            classes=CONTEXT_CLASSES if include_background else CONTEXT_CLASSES[1:],
            split=_split_file(os.path.join(root, "ImageSets", "SegmentationContext"), split),
            reduce_zero_label=not include_background,
            transforms=transforms,
        )


@DATASETS.register()
class ADE20K(SemSegFolder):
    """ADE20K SceneParsing (``ADEChallengeData2016``): 150 classes, raw 0 ("other") ignored.

    Layout: ``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png`` (values 0..150);
    labels are reduced by one (``reduce_zero_label``), so class ``c`` is :data:`ADE20K_CLASSES`\\ ``[c]``.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``"training"`` or ``"validation"``.
        transforms: label-map pipeline, as in :class:`~segkit.data.semseg.SemSegFolder`.

    Example:
        >>> ds = ADE20K(root="data/ADEChallengeData2016", split="validation")
    """

    def __init__(self, *, root: str, split: str = "training", transforms: _Transforms = None) -> None:
        if split not in ("training", "validation"):
            raise ConfigError(f"ADE20K split must be 'training' or 'validation', got {split!r}."
                              + did_you_mean(str(split), ["training", "validation"]), key="split")
        root = os.fspath(root)
        self.root, self.split = root, split
        super().__init__(img_dir=os.path.join(root, "images", split),
                         ann_dir=os.path.join(root, "annotations", split),
                         classes=ADE20K_CLASSES, reduce_zero_label=True, transforms=transforms)


@DATASETS.register()
class Cityscapes(SemSegFolder):
    """Cityscapes fine annotations: the 19 evaluated classes (:data:`CITYSCAPES_CLASSES`).

    Layout: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``, as the dataset is distributed. Label ids
    become train ids 0..18 (:data:`CITYSCAPES_LABEL_IDS`); every other id is ignored. With
    ``label_type: labelTrainIds`` the ``*_gtFine_labelTrainIds.png`` files written by the dataset's
    own scripts are read instead (values 0..18 and 255).

    Args:
        root: the folder holding ``leftImg8bit`` and ``gtFine``.
        split: ``"train"``, ``"val"`` or ``"test"`` (test labels are all void), or any subfolder name.
        label_type: ``"labelIds"`` or ``"labelTrainIds"``.
        transforms: label-map pipeline, as in :class:`~segkit.data.semseg.SemSegFolder`.

    Example:
        >>> ds = Cityscapes(root="data/cityscapes", split="val")
        >>> len(ds), ds.num_classes
        (500, 19)
    """

    def __init__(self, *, root: str, split: str = "train", label_type: str = "labelIds",
                 transforms: _Transforms = None) -> None:
        if label_type not in _CITYSCAPES_LABELS:
            raise ConfigError(f"Cityscapes label_type must be one of {', '.join(map(repr, _CITYSCAPES_LABELS))}, "
                              f"got {label_type!r}." + did_you_mean(str(label_type), list(_CITYSCAPES_LABELS)),
                              key="label_type")
        root = os.fspath(root)
        self.root, self.split, self.label_type = root, split, label_type
        ids = dict(zip(CITYSCAPES_LABEL_IDS, range(len(CITYSCAPES_CLASSES)), strict=True))
        super().__init__(img_dir=os.path.join(root, "leftImg8bit", split), ann_dir=os.path.join(root, "gtFine", split),
                         classes=CITYSCAPES_CLASSES, img_suffix="_leftImg8bit.png",
                         seg_suffix=_CITYSCAPES_LABELS[label_type],
                         label_map=ids if label_type == "labelIds" else None, palette=CITYSCAPES_PALETTE,
                         transforms=transforms)


@DATASETS.register()
class ShapesSegmentation(SemSegFolder):
    """The synthetic :class:`~segkit.data.shapes.Shapes` images with their semantic label maps.

    Classes: ``("background", "circle", "square", "triangle")`` (or background and the chosen
    ``categories``); each pixel is labelled with its front-most shape. Every image is kept, in the
    order of the Shapes image ids.

    Args:
        split, num_images, image_size, seed, root, categories, min_objects, max_objects, progress:
            as in :class:`~segkit.data.shapes.Shapes` (the same arguments share one cache folder).
        transforms: label-map pipeline, as in :class:`SemSegFolder`.

    Attributes:
        instances: the :class:`~segkit.data.shapes.Shapes` dataset of the same images, in the same
            order (its instance masks agree with the label maps).

    Example:
        >>> ds = ShapesSegmentation(split="val", num_images=50)
        >>> image, target = ds[0]  # target["sem_seg"]: int64 [128, 128] in 0..3
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
        root: str | None = None,
        categories: Sequence[str] | None = None,
        min_objects: int = 2,
        max_objects: int = 7,
        transforms: _Transforms = None,
        progress: bool = True,
    ) -> None:
        self.instances = Shapes(split=split, num_images=num_images, image_size=image_size, seed=seed, root=root,
                                categories=categories, min_objects=min_objects, max_objects=max_objects,
                                skip_empty=False, progress=progress)
        names = [self.instances.coco.imgs[i]["file_name"] for i in self.instances.image_ids]
        samples = [(os.path.join(self.instances.img_dir, n), os.path.join(self.instances.label_dir, n)) for n in names]
        self._setup(img_dir=self.instances.img_dir, samples=samples,
                    classes=("background", *self.instances.classes), transforms=transforms)
