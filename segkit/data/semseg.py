"""Semantic segmentation datasets: an image folder with a folder of label maps.

A label map is an index image with the image's size whose pixel values are class indices: a PNG in
PIL mode ``"P"`` (palette, as Pascal VOC ships them), ``"L"`` (greyscale) or ``"I"``/``"I;16"``
(for more than 256 classes), or an SBD ``.mat`` file (``GTcls.Segmentation``). Colour (``"RGB"`` /
``"RGBA"``) label images are rejected: their colours must first be converted to indices.

Raw values become class indices ``0..K-1`` in one of three ways: unchanged (default);
``reduce_zero_label`` (ADE20K, Pascal-Context 59: raw 0 becomes ``ignore_index``, every other value
``v`` becomes ``v - 1``); or ``label_map`` (``{raw value: class index}``, unlisted values become
``ignore_index``). A pixel whose value is then neither a class index nor ``ignore_index`` is an
error naming the file, checked each time the sample is read.

``dataset[i]`` returns ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``; ``target``
has ``sem_seg`` (int64 ``[H, W]``, ``0..K-1``, ``ignore_index`` for unlabelled pixels), ``image_id``
(``i``), ``file_name`` (the image's path relative to the image folder) and ``orig_size`` (int64
``[2]``, height and width of the image file), all after the transforms (see
:func:`~segkit.data.transforms.build_seg_transforms`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch

from segkit.data.images import load_image, open_image
from segkit.data.transforms import (
    apply_seg_transforms,
    build_seg_transforms,
    follow_torch_seed,
)
from segkit.errors import ConfigError, DatasetError
from segkit.registry import DATASETS, check_arguments
from segkit.textio import read_names

__all__ = ["SemSegFolder", "default_palette", "read_label_map", "read_split_file"]

_INDEX_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "1")
_SHOW = 5


def default_palette(num_classes: int) -> np.ndarray:
    """Pascal VOC's colour map for ``num_classes`` classes: uint8 ``[K, 3]`` RGB, class 0 black.

    The bits of each class index are spread over the three channels, most significant first, so
    neighbouring indices get clearly different colours (VOC's own PNG palettes use this map).
    """
    index = np.arange(num_classes, dtype=np.int64)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):  # 8 rounds of 3 bits cover indices up to 2**24
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def read_label_map(path: str) -> np.ndarray:
    """Read an index label map (PNG or other PIL image, or SBD ``.mat``) as int32 ``[H, W]``.

    Raises:
        DatasetError: the file is missing, cannot be decoded, is a colour image, or (``.mat``) lacks
            ``GTcls.Segmentation``; the message names the file and the fix.
    """
    if path.endswith(".mat"):
        return _read_sbd_mat(path)
    if not os.path.isfile(path):
        raise DatasetError(f"label map '{path}' does not exist. Every image needs a label map of the same "
                           f"stem in the annotation folder.")
    try:
        with open_image(path, f"label map '{path}'") as im:
            if im.mode not in _INDEX_MODES:
                raise DatasetError(_colour_label_message(path, im.mode))
            return np.asarray(im, dtype=np.int32)
    except DatasetError as exc:
        if exc.__cause__ is None:  # a message of its own (a colour image, the pixel limit)
            raise
        raise DatasetError(f"cannot decode label map '{path}': {exc.__cause__}. Replace the file or remove its image "
                           f"from the dataset.") from exc.__cause__


def _colour_label_message(path: str, mode: str) -> str:
    return (f"label map '{path}' is a colour image (PIL mode '{mode}'), but a label map must be an index "
            f"image whose pixel values are class indices: a palette PNG (mode 'P') or a greyscale PNG "
            f"(mode 'L'). Convert the colours to class indices (for a grey image stored as RGB, save one "
            f"channel as mode 'L').")


def _read_sbd_mat(path: str) -> np.ndarray:
    import scipy.io  # only SBD needs it

    if not os.path.isfile(path):
        raise DatasetError(f"SBD label file '{path}' does not exist; check sbd_root (SBD's 'dataset' folder).")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"cannot read SBD label file '{path}': {exc}") from exc
    segmentation = getattr(mat.get("GTcls"), "Segmentation", None)
    if segmentation is None or np.ndim(segmentation) != 2:
        raise DatasetError(f"SBD label file '{path}' has no 2-D 'GTcls.Segmentation' array; use the files "
                           f"of SBD's dataset/cls folder.")
    return np.asarray(segmentation, dtype=np.int32)


def read_split_file(path: str) -> list[str]:
    """The non-empty, stripped lines of a split file (one image stem per line).

    Raises:
        DatasetError: the file does not exist or lists no stem.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"split file '{path}' does not exist. It lists one image name without suffix per "
                           f"line; check the path.")
    stems = read_names(path, error=DatasetError, what="split file")
    if not stems:
        raise DatasetError(f"split file '{path}' is empty; list one image name without suffix per line.")
    return stems


@DATASETS.register()
class SemSegFolder(torch.utils.data.Dataset):
    """Images and label maps of the same stem in two folders (see the module docstring).

    Args:
        img_dir: folder of the images; searched recursively when ``split`` is not given.
        ann_dir: folder of the label maps, mirroring ``img_dir``'s layout.
        classes: class names in index order (background included when it is a class), or the
            path of a text file with one name per line.
        img_suffix / seg_suffix: file endings of images and label maps.
        split: optional text file listing the stems (paths relative to ``img_dir`` without suffix)
            to use, one per line; default: every image found.
        reduce_zero_label: raw 0 becomes ``ignore_index``, raw ``v`` becomes ``v - 1`` (ADE20K).
        label_map: ``{raw value: class index}``; raw values it does not list become ``ignore_index``.
        ignore_index: label of unlabelled pixels, in ``0..65535``.
        transforms: albumentations pipeline as a list of ``{type, **kwargs}`` or a built ``A.Compose``
            (see :func:`~segkit.data.transforms.build_seg_transforms`).
        palette: colours for drawing, ``[K, 3]`` RGB in ``0..255``; default :func:`default_palette`.

    Attributes:
        classes (tuple[str, ...]): the class names, in index order.
        num_classes (int): ``len(classes)``.
        palette (numpy.ndarray): uint8 ``[K, 3]`` RGB colours of the classes.
        ignore_index (int): label of unlabelled pixels.

    Raises:
        DatasetError: no image found, an image without label map (the first few are named), a
            missing split file or image it lists; when a sample is read: a label map of another size
            than its image, a colour label image, or values that are neither a class nor ignored.
        ConfigError: malformed ``classes``, ``label_map``, ``palette`` or ``ignore_index``, or both
            ``reduce_zero_label`` and ``label_map``.

    Example:
        >>> ds = SemSegFolder(img_dir="data/ade/images/training", ann_dir="data/ade/annotations/training",
        ...                   classes="data/ade/classes.txt", reduce_zero_label=True)
        >>> image, target = ds[0]  # float32 [3, H, W]; target["sem_seg"] int64 [H, W]
    """

    def __init__(
        self,
        *,
        img_dir: str,
        ann_dir: str,
        classes: Sequence[str] | str,
        img_suffix: str = ".jpg",
        seg_suffix: str = ".png",
        split: str | None = None,
        reduce_zero_label: bool = False,
        label_map: Mapping[int, int] | None = None,
        ignore_index: int = 255,
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        img_dir, ann_dir = os.fspath(img_dir), os.fspath(ann_dir)
        stems = (read_split_file(os.fspath(split)) if split is not None else _scan_stems(img_dir, img_suffix))
        if split is not None:
            _check_images_listed(stems, img_dir, img_suffix, os.fspath(split))
        samples = [(os.path.join(img_dir, s + img_suffix), os.path.join(ann_dir, s + seg_suffix)) for s in stems]
        self._setup(img_dir=img_dir, samples=samples, classes=classes, reduce_zero_label=reduce_zero_label,
                    label_map=label_map, ignore_index=ignore_index, transforms=transforms, palette=palette)

    def _setup(
        self,
        *,
        img_dir: str,
        samples: Sequence[tuple[str, str]],
        classes: Sequence[str] | str,
        reduce_zero_label: bool = False,
        label_map: Mapping[int, int] | None = None,
        ignore_index: int = 255,
        transforms: Sequence[Mapping[str, Any]] | A.Compose | None = None,
        palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> None:
        """Check the options and store ``samples``: ``(image path, label path)`` pairs in order."""
        self.img_dir = img_dir
        self.ignore_index = _check_ignore_index(ignore_index)
        self.classes: tuple[str, ...] = _load_classes(classes)
        if reduce_zero_label and label_map is not None:
            raise ConfigError("reduce_zero_label and label_map cannot be combined; express the shift in "
                              "label_map ({1: 0, 2: 1, ...}; unlisted values are ignored).", key="label_map")
        self.reduce_zero_label = bool(reduce_zero_label)
        self._lut = None if label_map is None else _label_lut(label_map, len(self.classes), self.ignore_index)
        self.palette = _check_palette(palette, len(self.classes))
        if isinstance(transforms, A.Compose):
            self.transforms = transforms
        else:
            self.transforms = build_seg_transforms(transforms, path="transforms", ignore_index=self.ignore_index)
        missing = [label for _, label in samples if not os.path.isfile(label)]
        if missing:
            raise DatasetError(f"{len(missing)} of {len(samples)} images have no label map: "
                               f"{_show(missing)} do not exist. Add the label maps, or list only annotated "
                               f"images in a split file (check ann_dir and seg_suffix).")
        self._samples = list(samples)
        self._transform_seed: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, path: str = "", **defaults: Any) -> SemSegFolder:
        """Build from a config mapping, reporting errors in ``transforms`` under ``path``."""
        kwargs = {**defaults, **cfg}
        check_arguments(cls, kwargs, path=path, type_name=cls.__name__, kind="dataset")
        if not isinstance(kwargs.get("transforms"), A.Compose):
            key = f"{path}.transforms" if path else "transforms"
            kwargs["transforms"] = build_seg_transforms(kwargs.get("transforms"), path=key,
                                                        ignore_index=kwargs.get("ignore_index", 255))
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if path and exc.key and not exc.key.startswith(f"{path}."):
                exc.key = f"{path}.{exc.key}"
            raise

    # ------------------------------------------------------------------ samples
    @property
    def num_classes(self) -> int:
        """Number of classes K (label values ``0..K-1``)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._samples)

    def image_path(self, index: int) -> str:
        """Path of the image file of sample ``index``."""
        return self._samples[index][0]

    def label_path(self, index: int) -> str:
        """Path of the label map file of sample ``index``."""
        return self._samples[index][1]

    def raw_label_values(self) -> np.ndarray | None:
        """The raw label value that stands for each class index (int64 ``[K]``), the inverse of
        :meth:`load_label`'s mapping: ``c + 1`` with ``reduce_zero_label``, the smallest raw value
        ``label_map`` maps to ``c`` (``ignore_index`` for a class no raw value maps to); ``None``
        when raw values are the class indices. Predicted label maps written with it compare with
        the dataset's own label files."""
        if self._lut is not None:
            table = self._lut[:-1]
            return np.asarray([int(np.flatnonzero(table == c)[0]) if (table == c).any() else self.ignore_index
                               for c in range(self.num_classes)], dtype=np.int64)
        if self.reduce_zero_label:
            return np.arange(1, self.num_classes + 1, dtype=np.int64)
        return None

    def class_indices(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values (as read from a label file) as class indices or ``ignore_index``, unchecked."""
        if self._lut is not None:
            return self._lut[np.where((raw < 0) | (raw >= len(self._lut)), len(self._lut) - 1, raw)]
        if self.reduce_zero_label:
            return np.where((raw == 0) | (raw == self.ignore_index), self.ignore_index, raw - 1)
        return raw

    def load_label(self, index: int) -> np.ndarray:
        """The label map of sample ``index`` as class indices, before transforms: int32 ``[H, W]``.

        Raises:
            DatasetError: the file is not an index image, or holds values that are neither a class
                index nor ``ignore_index`` after the label mapping (the raw values are named).
        """
        path = self.label_path(index)
        raw = read_label_map(path)
        label = self.class_indices(raw)
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(raw[bad])
            how = " after reduce_zero_label (raw v is class v-1)" if self.reduce_zero_label else ""
            raise DatasetError(
                f"label map '{path}' holds the value(s) {_show(values.tolist(), quote=False)}, which are "
                f"neither a class index 0..{self.num_classes - 1}{how} nor the ignore value "
                f"{self.ignore_index} ({self.num_classes} classes). Fix classes, use label_map or "
                f"reduce_zero_label to convert the raw values, or set ignore_index."
            )
        return label.astype(np.int32, copy=False)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        index = range(len(self))[index]  # IndexError past the end; negative indices count back
        image_path = self.image_path(index)
        image = load_image(image_path, image_id=index)
        label = self.load_label(index)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"label map '{self.label_path(index)}' is {label.shape[0]}x{label.shape[1]} (HxW) but its image "
                f"'{image_path}' is {image.shape[0]}x{image.shape[1]}; a label map must have its image's "
                f"size (resize it with nearest-neighbour interpolation, or fix the pairing)."
            )
        self._transform_seed = follow_torch_seed(self.transforms, self._transform_seed)
        image_t, label_t = apply_seg_transforms(self.transforms, image=image, label=label,
                                                ignore_index=self.ignore_index)
        target = {
            "sem_seg": label_t,
            "image_id": index,
            "file_name": os.path.relpath(image_path, self.img_dir),
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),
        }
        return image_t, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_dir='{self.img_dir}', images={len(self)}, "
                f"num_classes={self.num_classes}, ignore_index={self.ignore_index})")


# ---------------------------------------------------------------------- helpers
def _scan_stems(img_dir: str, suffix: str) -> list[str]:
    """Sorted paths relative to ``img_dir``, without ``suffix``, of the files ending in ``suffix``."""
    if not os.path.isdir(img_dir):
        raise DatasetError(f"image folder '{img_dir}' does not exist; check img_dir (relative paths are "
                           f"resolved from {os.getcwd()}).")
    stems, others = [], {}
    for folder, _, files in os.walk(img_dir, followlinks=True):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), img_dir)
            if name.endswith(suffix):
                stems.append(rel[: len(rel) - len(suffix)])
            else:
                ext = os.path.splitext(name)[1]
                others[ext] = others.get(ext, 0) + 1
    if not stems:
        found = ", ".join(f"{n} '{e}'" for e, n in sorted(others.items(), key=lambda kv: -kv[1])[:3])
        hint = f" It holds files ending in: {found}; set img_suffix to match." if found else " The folder is empty."
        raise DatasetError(f"no images ending in '{suffix}' found under '{img_dir}'.{hint}")
    return sorted(stems)


def _check_images_listed(stems: Sequence[str], img_dir: str, suffix: str, split: str) -> None:
    paths = [os.path.join(img_dir, s + suffix) for s in stems]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DatasetError(f"split file '{split}' lists {len(missing)} image(s) that do not exist: {_show(missing)}. "
                           f"Check img_dir and img_suffix, or remove them from the split file.")


def _load_classes(classes: Sequence[str] | str | os.PathLike) -> tuple[str, ...]:
    if isinstance(classes, (str, os.PathLike)):
        path = os.fspath(classes)
        if not os.path.isfile(path):
            raise ConfigError(f"classes is a path, but '{path}' does not exist; give a list of class names or "
                              f"a text file with one name per line.", key="classes")
        names = read_names(path, error=functools.partial(ConfigError, key="classes"), what="class file")
        where = f"the class file '{path}'"
    elif isinstance(classes, Sequence):
        names, where = list(classes), "classes"
    else:
        raise ConfigError(f"classes must be a list of names or a text file path, got {classes!r}", key="classes")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where} must hold at least one class name, all non-empty strings; got {names!r}",
                          key="classes")
    return tuple(names)


def _check_ignore_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 65535:
        raise ConfigError(f"ignore_index must be an integer in 0..65535 (usually 255), got {value!r}",
                          key="ignore_index")
    return int(value)


def _label_lut(label_map: Mapping[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """Lookup table ``raw value -> class index``; its last entry (``ignore_index``) serves unlisted values."""
    if not isinstance(label_map, Mapping) or not label_map:
        raise ConfigError(f"label_map must be a non-empty mapping {{raw value: class index}}, got {label_map!r}",
                          key="label_map")
    pairs = []
    for raw, cls in label_map.items():
        try:
            raw_i, cls_i = int(raw), int(cls)
        except (TypeError, ValueError):
            raise ConfigError(f"label_map entry {raw!r}: {cls!r} is not a pair of integers", key="label_map") from None
        if raw_i < 0 or raw_i > 65535 or not (0 <= cls_i < num_classes or cls_i == ignore_index):
            raise ConfigError(f"label_map entry {raw!r}: {cls!r} needs a raw value in 0..65535 and a class index in "
                              f"0..{num_classes - 1} (or ignore_index {ignore_index})", key="label_map")
        pairs.append((raw_i, cls_i))
    lut = np.full(max(r for r, _ in pairs) + 2, ignore_index, dtype=np.int32)
    raws, classes = np.array(pairs, dtype=np.int64).T
    lut[raws] = classes
    return lut


def _check_palette(palette: Any, num_classes: int) -> np.ndarray:
    if palette is None:
        return default_palette(num_classes)
    array = np.asarray(palette)
    if array.shape != (num_classes, 3) or not np.issubdtype(array.dtype, np.number) or (array < 0).any() \
            or (array > 255).any():
        raise ConfigError(f"palette must list one RGB colour (three values in 0..255) per class, "
                          f"{num_classes} in all; got an array of shape {array.shape}", key="palette")
    return array.astype(np.uint8)


def _show(items: Sequence[Any], *, quote: bool = True) -> str:
    """The first few items, quoted, and how many there are."""
    shown = ", ".join(f"'{i}'" if quote else str(i) for i in items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")
