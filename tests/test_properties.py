"""Property-based tests: the config merger and overrides, the COCO and VOC loaders on random (and
randomly broken) input, and a fuzz pass over the box and mask ops against torchvision."""

from __future__ import annotations

import copy
import json
import string

import pytest
import torch
import torchvision
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from segkit.config import DELETE_KEY, Config, apply_overrides, merge  # noqa: E402
from segkit.data.coco import CocoDataset, DatasetError  # noqa: E402
from segkit.data.voc import parse_voc_xml  # noqa: E402
from segkit.errors import ConfigError  # noqa: E402
from segkit.ops.box_coder import BoxCoder  # noqa: E402
from segkit.ops.masks import paste_masks_in_image  # noqa: E402
from segkit.ops.roi_align import roi_align  # noqa: E402

# derandomize: the same examples on every run, so the suite is reproducible (a fixed corpus per test)
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------- config
keys = st.sampled_from(list("abcde"))
leaves = st.one_of(st.integers(-5, 5), st.booleans(), st.none(), st.text(string.ascii_lowercase, max_size=3),
                   st.lists(st.integers(0, 3), max_size=3))
trees = st.recursive(leaves, lambda children: st.dictionaries(keys, children, max_size=4), max_leaves=12)
mappings = st.dictionaries(keys, trees, max_size=4)


def leaf_paths(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaf_paths(value, prefix + (key,))
    else:
        yield prefix, tree


def lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@FAST
@given(mappings, mappings)
def test_merge_override_wins_and_base_survives(base, override):
    before = copy.deepcopy((base, override))
    out = merge(base, override)
    assert (base, override) == before  # inputs untouched
    for path, value in leaf_paths(override):
        if path and value != {}:  # an empty mapping merges into the base and changes nothing
            assert lookup(out, path) == value
    for path, value in leaf_paths(base):
        if path and _survives(override, path):
            assert lookup(out, path) == value


def _survives(override, path) -> bool:
    """Whether a base leaf at ``path`` is out of the override's reach (kept by the merge)."""
    node = override
    for key in path:
        if key not in node:
            return True
        node = node[key]
        if not isinstance(node, dict):
            return False
    return False


@FAST
@given(mappings, mappings, mappings)
def test_merge_applies_an_override_once(a, b, c):
    # applying the same file twice changes nothing more; the merge is a left fold, as _base_ lists are
    once = merge(merge(a, b), c)
    assert merge(once, c) == once
    assert merge(merge(a, b), b) == merge(a, b)


@FAST
@given(mappings, keys, st.dictionaries(keys, leaves, max_size=3))
def test_delete_key_replaces_the_whole_mapping(base, key, replacement):
    out = merge(base, {key: {DELETE_KEY: True, **replacement}})
    assert out[key] == replacement


@FAST
@given(st.lists(keys, min_size=1, max_size=3), st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(),
       st.lists(st.integers(0, 9), max_size=4), st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: round(v, 3))))
def test_override_sets_the_yaml_value_at_the_dotted_key(path, value):
    cfg = Config({"model": {"x": {"y": 1}}, "trainer": {}})
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    apply_overrides(cfg, [f"model.{'.'.join(path)}={text}"])
    assert lookup(cfg["model"], path) == value
    assert cfg["model"]["x"] == {"y": 1}  # nothing else touched
    with pytest.raises(ConfigError, match="'model.x.y' is a int, not a mapping"):
        apply_overrides(cfg, [f"model.x.y.{'.'.join(path)}={text}"])


@FAST
@given(st.text(string.ascii_lowercase + "._=", min_size=1, max_size=12))
def test_malformed_overrides_raise_config_error_only(item):
    cfg = Config({"model": {}})
    try:
        apply_overrides(cfg, [item])
    except ConfigError:
        pass


# ---------------------------------------------------------------------- COCO loader
@st.composite
def coco_files(draw):
    """A valid COCO instances dict: images with sizes, boxes anywhere near them, crowd flags."""
    n_images = draw(st.integers(1, 4))
    cats = draw(st.lists(st.integers(1, 90), min_size=1, max_size=3, unique=True))
    images = [{"id": i + 1, "file_name": f"{i + 1}.png", "height": draw(st.integers(8, 40)),
               "width": draw(st.integers(8, 40))} for i in range(n_images)]
    anns = []
    for k in range(draw(st.integers(0, 8))):
        img = draw(st.sampled_from(images))
        x, y = draw(st.floats(-10, 50)), draw(st.floats(-10, 50))
        w, h = draw(st.floats(0, 30)), draw(st.floats(0, 30))
        anns.append({"id": k + 1, "image_id": img["id"], "category_id": draw(st.sampled_from(cats)),
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(draw(st.booleans()) and draw(st.booleans()))})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}


@FAST
@given(coco_files())
def test_coco_loader_clips_boxes_and_keeps_only_usable_ones(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("coco") / "ann.json"
    path.write_text(json.dumps(data))
    with _no_check():
        ds = CocoDataset(ann_file=str(path), img_dir=str(path.parent))
    assert len(ds) == len(data["images"]) and ds.num_classes == len(data["categories"])
    for img in data["images"]:
        boxes, labels, _ = ds._records[img["id"]]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= img["width"]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= img["height"]).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
        assert set(labels.tolist()) <= set(range(1, ds.num_classes + 1))
        crowd = sum(a["iscrowd"] for a in data["annotations"] if a["image_id"] == img["id"])
        assert len(labels) <= sum(a["image_id"] == img["id"] for a in data["annotations"]) - crowd


class _no_check:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _mutate(data, choice, value):
    """Break one thing in a COCO dict: drop a key, replace a value with junk."""
    data = copy.deepcopy(data)
    section = ["images", "annotations", "categories"][choice % 3]
    if choice % 5 == 0:
        data.pop(section)
    elif data[section]:
        item = data[section][choice % len(data[section])]
        key = sorted(item)[choice % len(item)]
        item[key] = value
    else:
        data[section] = value
    return data


@FAST
@given(coco_files(), st.integers(0, 1000), st.one_of(st.none(), st.text(max_size=3), st.integers(-3, 3),
                                                      st.lists(st.integers(), max_size=5), st.floats(allow_nan=True)))
def test_broken_coco_files_give_dataset_or_config_errors(tmp_path_factory, data, choice, value):
    path = tmp_path_factory.mktemp("coco") / "ann.json"
    path.write_text(json.dumps(_mutate(data, choice, value)))
    try:
        with _no_check():
            ds = CocoDataset(ann_file=str(path), img_dir=str(path.parent))
        len(ds)
    except (DatasetError, ConfigError):
        pass


# ---------------------------------------------------------------------- VOC loader
VOC_OK = ("<annotation><filename>a.jpg</filename><size><width>20</width><height>10</height></size>"
          "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>9</xmax>"
          "<ymax>8</ymax></bndbox></object></annotation>")


@FAST
@given(st.integers(0, len(VOC_OK) - 1), st.integers(0, 12), st.text(max_size=4))
def test_broken_voc_xml_gives_dataset_errors_naming_the_file(tmp_path_factory, start, length, junk):
    text = VOC_OK[:start] + junk + VOC_OK[start + length:]
    path = tmp_path_factory.mktemp("voc") / "x.xml"
    path.write_text(text, encoding="utf-8")
    try:
        record = parse_voc_xml(str(path))
    except DatasetError as exc:
        assert str(path) in str(exc)
    else:
        for obj in record["objects"]:
            xmin, ymin, xmax, ymax = obj["bbox"]
            assert xmin <= xmax and ymin <= ymax and obj["difficult"] in (0, 1)


# ---------------------------------------------------------------------- box and mask ops
boxes_strategy = st.lists(
    st.tuples(st.floats(-4, 36), st.floats(-4, 36), st.floats(0, 20), st.floats(0, 20)), min_size=0, max_size=6)


def _xyxy(items):
    if not items:
        return torch.zeros(0, 4)
    b = torch.tensor(items, dtype=torch.float32)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


@FAST
@given(boxes_strategy, st.sampled_from([1, 2]), st.sampled_from([0.25, 0.5, 1.0]), st.booleans())
def test_roi_align_training_path_equals_torchvision(items, sampling, scale, aligned):
    """Empty sets, single-pixel and zero-size boxes, boxes over the border: values and gradients."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    boxes = _xyxy(items)
    rois = torch.cat([torch.arange(len(boxes)).remainder(2).float()[:, None], boxes], dim=1)
    ours = roi_align(x, rois, 3, scale, sampling, aligned)
    ref = torchvision.ops.roi_align(x, rois, 3, scale, sampling, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if len(boxes):
        weights = torch.rand_like(ref)
        g_ours, = torch.autograd.grad((ours * weights).sum(), x)
        g_ref, = torch.autograd.grad((ref * weights).sum(), x)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@FAST
@given(boxes_strategy, st.integers(10, 40), st.integers(10, 40))
def test_paste_masks_equals_torchvision(items, height, width):
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    boxes = _xyxy(items)
    torch.manual_seed(1)
    masks = torch.rand(len(boxes), 1, 7, 7)
    ours = paste_masks_in_image(masks, boxes, (height, width))
    assert ours.shape == (len(boxes), height, width)
    for k in range(len(boxes)):
        try:
            ref = tv_paste(masks[k:k + 1], boxes[k:k + 1], (height, width))[0, 0]
        except RuntimeError:  # torchvision fails on a box wholly outside the image; nothing is pasted
            assert not ours[k].any()
            continue
        torch.testing.assert_close(ours[k], ref, rtol=1e-5, atol=1e-5)


sized_boxes = st.lists(
    st.tuples(st.floats(-4, 36), st.floats(-4, 36), st.floats(0.5, 20), st.floats(0.5, 20)), min_size=0, max_size=6)


@FAST
@given(sized_boxes, st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]))
def test_box_coder_round_trip(items, weights):
    refs = _xyxy(items)
    coder = BoxCoder(weights=weights)
    targets = refs + torch.linspace(-1, 1, 4)
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 0.5)
    decoded = coder.decode(coder.encode(targets, refs), refs)
    assert decoded.shape == refs.shape
    torch.testing.assert_close(decoded, targets, rtol=1e-4, atol=1e-3)
    assert torch.isfinite(coder.decode(torch.full((len(refs), 4), 50.0), refs)).all()  # clamped, no overflow
