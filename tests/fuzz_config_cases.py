"""Fuzz cases of configs: the tiny detector or segmentor config with a few values replaced, run by a command.

A case edits one to three keys (known keys, whole sections, unknown or deleted keys, ``_base_``), may edit the
YAML text as a whole (duplicate keys, several documents, tabs...) and write it in another encoding, adds
malformed ``key=value`` overrides now and then, and runs ``segkit train`` (bounded to one step), ``config``,
``data check`` or ``eval``.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from fuzz_harness import Case
from fuzz_inputs import (FEW, SPECIAL_NUMBERS, Raw, alias_bomb, delete_path, dump_yaml, encode, leaf_values,
                         mostly_utf8, set_path, short, yaml_values)
from fuzz_shared import BOUNDED_TRAINING, Shared

DET_KEYS = [
    "seed", "work_dir", "imports", "_base_", "model", "model.type", "model.backbone", "model.backbone.type",
    "model.backbone.depth", "model.backbone.base_channels", "model.neck", "model.neck.out_channels",
    "model.rpn_head.anchor_sizes", "model.rpn_head.pre_nms_top_n_train", "model.rpn_head.post_nms_top_n_train",
    "model.roi_head", "model.roi_head.num_classes", "model.roi_head.batch_size_per_image",
    "model.roi_head.box_head", "model.roi_head.box_head.fc_dim", "data", "data.batch_size", "data.num_workers",
    "data.train", "data.train.type", "data.train.num_images", "data.train.image_size", "data.train.split",
    "data.train.transforms", "data.val", "data.val.with_masks", "optimizer", "optimizer.type", "optimizer.lr",
    "optimizer.weight_decay", "optimizer.momentum", "optimizer.backbone_lr_mult", "optimizer.auto_scale_lr",
    "scheduler", "scheduler.type", "scheduler.warmup", "scheduler.warmup_iters", "scheduler.warmup_ratio",
    "scheduler.milestones", "scheduler.gamma", "scheduler.power", "scheduler.by_epoch", "trainer",
    "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.precision",
    "trainer.gradient_clip_val", "trainer.accumulate_grad_batches", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.strategy", "evaluation", "evaluation.type", "evaluation.main_metric",
    "evaluation.backend", "evaluation.per_class", "engine", "engine.max_nonfinite_steps", "engine.ema",
    "engine.keep_best",
]
SEG_KEYS = [
    "seed", "work_dir", "model", "model.type", "model.backbone.strides", "model.backbone.dilations",
    "model.decode_head", "model.decode_head.type", "model.decode_head.channels", "model.decode_head.num_codes",
    "model.decode_head.num_classes", "model.decode_head.in_features", "model.auxiliary_head",
    "model.auxiliary_head.loss_weight", "model.test_cfg", "model.test_cfg.mode", "model.test_cfg.crop_size",
    "model.test_cfg.stride", "model.test_cfg.scales", "model.test_cfg.flip", "data.batch_size",
    "data.num_workers", "data.train.type", "data.train.image_size", "data.val", "optimizer.lr", "optimizer.type",
    "scheduler.type", "scheduler.power", "scheduler.warmup_iters", "trainer.max_epochs", "trainer.accelerator",
    "evaluation.main_metric", "evaluation.type", "evaluation.ignore_index",
]
# plausible but wrong values, tried beside the generic ones
KEY_VALUES: dict[str, list[Any]] = {
    "optimizer.type": ["SGD", "Adam", "sgd", "Nope", "torch.optim.SGD", "LBFGS", "SparseAdam", "Optimizer"],
    "trainer.accelerator": ["gpu", "cuda", "mps", "tpu", "auto", "cpu", "ipu", "hpu", "xla"],
    "trainer.precision": ["16-mixed", "bf16-mixed", "64", 16, "32-true", "8", "transformer-engine"],
    "trainer.strategy": ["ddp", "nope", "deepspeed", "fsdp", 5],
    "evaluation.main_metric": ["bbox/ap", "segm/AP", "mIoU", "bogus", "bbox/AP50", "aAcc", ""],
    "evaluation.backend": ["faster_coco_eval", "pycocotool", "auto", "pycocotools", ""],
    "evaluation.type": ["CocoEvaluator", "SemSegEvaluator", "VOCEvaluator", "Nope"],
    "scheduler.type": ["MultiStep", "Cosine", "Poly", "Constant", "Step", "OneCycle"],
    "scheduler.warmup": ["linear", "constant", "exp", None],
    "model.type": ["TwoStageDetector", "EncoderDecoder", "Nope", "ResNet"],
    "model.backbone.type": ["ResNet", "ResNeXt", "SENet", "FPN", "Nope"],
    "model.decode_head.type": ["EncHead", "FCNHead", "Nope", "RPN"],
    "model.test_cfg.mode": ["whole", "slide", "nope"],
    "data.train.type": ["Shapes", "ShapesSegmentation", "CocoDataset", "VOCDetection", "Nope"],
    "imports": [[], ["nonexistent_module_xyz"], "segkit", [5], [""], ["."], ["..x"], ["/etc/passwd"], ["os.path"]],
}
# keys whose generic hostile values would cost the machine rather than test segkit (thousands of processes),
# or send the run's files outside the sandbox on the user's explicit request: only these values are tried
SAFE_VALUES: dict[str, list[Any]] = {
    "trainer.devices": ["auto", 0, "0", None, 1.5, [0], "x", 1, "1"],
    "data.num_workers": [-1, -5, 0, 1, 2, 2.5, "2", None, True, [1]],
    "work_dir": ["work", "work/sub", None, "", 5, [], {}, "work/../work", "work\x00x"],
}
SECTION_REPLACEMENTS = [[], [1, 2], "string", None, 0, 1.5, True, {}, {"type": "Nope"}, Raw(alias_bomb())]
ODD_KEYS = ["", ".", "a..b", ".seed", "seed.", "seed.x", "model.backbone.depth.x", "x[0]", "data.train.0",
            "日本", "a" * 300, "model..backbone", "unknown_section", "model.unknown", "trainer.unknown_option"]
DOCUMENT_EDITS = {
    "duplicate top-level key": lambda t: t + "\nseed: 7\n",
    "duplicate section": lambda t: t + "\noptimizer:\n  lr: 0.1\n",
    "second document": lambda t: t + "\n---\nseed: 1\n",
    "top-level list": lambda t: "- 1\n- 2\n",
    "top-level scalar": lambda t: "42\n",
    "tab indentation": lambda t: t.replace("  ", "\t"),
    "unclosed flow": lambda t: t + "\nextra: [1, 2\n",
}


def base_files(kind: str) -> dict[str, bytes]:
    """Extra config files that ``_base_`` values can name (relative to the config), by kind."""
    if kind == "chain":  # 40 files, each the base of the one before
        files = {f"in/b{i:03d}.yaml": f"_base_: [b{i + 1:03d}.yaml]\n" for i in range(39)} | {"in/b039.yaml": "{}\n"}
        return {name: text.encode() for name, text in files.items()}
    if kind == "fan-out":  # 12 levels, each listing the next 4 times: 4**12 reads unless bounded
        files = {f"in/f{i:02d}.yaml": f"_base_: [{', '.join([f'f{i + 1:02d}.yaml'] * 4)}]\n" for i in range(12)}
        return {name: text.encode() for name, text in files.items()} | {"in/f12.yaml": b"seed: 3\n"}
    if kind == "latin-1":
        return {"in/latin.yaml": "seed: 1 # caf\xe9\n".encode("latin-1")}
    if kind == "utf-16":
        return {"in/utf16.yaml": "seed: 1\n".encode("utf-16")}
    return {}


BASE_VALUES = {  # _base_ value -> the kind of files it needs
    "['c.yaml']": "", "['b000.yaml']": "chain", "['f00.yaml']": "fan-out", "['latin.yaml']": "latin-1",
    "['utf16.yaml']": "utf-16", "['missing.yaml']": "", "['..']": "", "['/']": "", "['/dev/zero']": "",
    "['/dev/null']": "", "['/etc/passwd']": "", "c.yaml": "", "5": "", "[5]": "", "[null]": "", "[{a: 1}]": "",
    "['']": "", "['c.yaml', 'c.yaml']": "", "['\\0']": "",
}


@st.composite
def config_cases(draw: st.DrawFn, shared: Shared) -> Case:
    """A tiny config with a few values replaced, written in some encoding, run by one command."""
    kind = draw(st.sampled_from(["det", "seg"]))
    tree = copy.deepcopy(shared.det_config if kind == "det" else shared.seg_config)
    keys = DET_KEYS if kind == "det" else SEG_KEYS
    tree, files, notes = draw(config_edits(tree, keys))
    text = dump_yaml(tree)
    unedited = [None] * 3 * len(DOCUMENT_EDITS)
    edit = draw(st.sampled_from(unedited + list(DOCUMENT_EDITS) + unedited))
    if edit:
        text = DOCUMENT_EDITS[edit](text)
        notes.append(edit)
    how = draw(mostly_utf8)
    if how != "utf-8":
        notes.append(how)
    files["in/c.yaml"] = encode(text, how)
    count = draw(st.sampled_from([0, 0, 1, 2, 0, 0]))
    overrides = draw(st.lists(override_strings(keys), min_size=count, max_size=count))
    if overrides:
        notes.append(f"overrides {overrides}")
    command = draw(st.sampled_from(["train", "config", "data check", "eval", "train", "train"]))
    ckpt = shared.det_ckpt if kind == "det" else shared.seg_ckpt
    argv = {"config": ["config", "in/c.yaml", *overrides],
            "train": ["train", "in/c.yaml", *overrides, *BOUNDED_TRAINING],
            "data check": ["data", "check", "in/c.yaml", *overrides, "--max-images", "2"],
            "eval": ["eval", "in/c.yaml", ckpt, *overrides, "trainer.limit_val_batches=1"]}[command]
    return Case("config", argv, files, writable=("work", "out", "data", "work_dirs"),
                exit_one_allowed=command == "data check", note=f"{kind}: " + "; ".join(notes))


@st.composite
def config_edits(draw: st.DrawFn, tree: dict[str, Any], keys: list[str]) -> tuple[Any, dict[str, bytes], list[str]]:
    """1-3 edits of the config ``tree`` (changed in place): the tree, the extra files they need, what changed."""
    notes, files = [], {}
    for _ in range(draw(FEW)):
        op = draw(st.sampled_from(["value"] * 3 + ["section", "unknown key", "delete", "base"] + ["value"] * 3))
        if op == "value":
            key = draw(st.sampled_from(keys))
            value = draw(value_for(key))
            set_path(tree, tuple(key.split(".")), value)
            notes.append(f"{key}={short(value)}")
        elif op == "section":
            section = draw(st.sampled_from(["model", "data", "optimizer", "scheduler", "trainer", "evaluation",
                                            "engine", "data.train", "model.backbone"]))
            value = draw(st.sampled_from(SECTION_REPLACEMENTS))
            set_path(tree, tuple(section.split(".")), value)
            notes.append(f"{section}={short(value)}")
        elif op == "unknown key":
            parent = draw(st.sampled_from(["", "model", "data", "data.train", "optimizer", "trainer", "evaluation"]))
            name = draw(st.sampled_from(["typo", "lrr", "max_epoch", "_delete_", "__class__", "0", ""]))
            set_path(tree, tuple(filter(None, parent.split("."))) + (name,), draw(leaf_values))
            notes.append(f"unknown key {parent}.{name}")
        elif op == "delete":
            key = draw(st.sampled_from(keys))
            delete_path(tree, tuple(key.split(".")))
            notes.append(f"deleted {key}")
        else:
            text = draw(st.sampled_from(list(BASE_VALUES)))
            tree = {"_base_": Raw(text), **tree}
            files.update(base_files(BASE_VALUES[text]))
            notes.append(f"_base_: {text}")
    return tree, files, notes


def value_for(key: str) -> st.SearchStrategy[Any]:
    """Values tried at ``key``: the safe ones only for keys in SAFE_VALUES, else plausible and generic ones."""
    if key in SAFE_VALUES:
        return st.sampled_from(SAFE_VALUES[key])
    if key == "_base_":
        return st.sampled_from([Raw(v) for v in BASE_VALUES if not BASE_VALUES[v]])
    if key in KEY_VALUES:
        return st.one_of(st.sampled_from(KEY_VALUES[key]), yaml_values)
    return yaml_values


# override values: YAML that reads as something odd, text, numbers
OVERRIDE_VALUES = ["1e-4", "nan", ".nan", "-1", "[1", "{a: 1}", "[]", "null", "~", "!!python/name:os.system",
                   "&a [*a]", "${env:HOME}", "${seed}", "${nope}", "'x'", "\"\\x00\"", "1" * 5000, alias_bomb()]
printable_short = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)


@st.composite
def override_strings(draw: st.DrawFn, keys: list[str]) -> str:
    """A ``key=value`` argument, well or badly formed, for a known or an odd key."""
    key = draw(st.sampled_from([k for k in keys if k not in SAFE_VALUES]) | st.sampled_from(ODD_KEYS))
    value = draw(st.one_of(st.sampled_from(OVERRIDE_VALUES), printable_short,
                           st.sampled_from([str(v) for v in SPECIAL_NUMBERS])))
    form = draw(st.sampled_from(["{k}={v}", "{k}", "={v}", "{k}=={v}", "{k}=", "{k} = {v}", "{k}={v}"]))
    return form.format(k=key, v=value)
