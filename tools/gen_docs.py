"""Write the generated reference pages of the documentation site.

    python tools/gen_docs.py [--out docs/reference]

``cli.md`` comes from the ``segkit`` argument parsers, ``components.md`` from the registries (the
components ``segkit list`` shows), ``api.md`` lists the public Python API for mkdocstrings and
``architectures.md`` describes models built from shipped configs (modules, parameters, feature shapes). The pages
are rebuilt from the code each time (``make docs``, ``tests/test_docs.py``), so they cannot drift.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import re
import sys
from collections.abc import Iterator

from segkit.cli import (build_parser, component_signature, component_source, dataset_converter_parsers,
                        list_components)
from segkit.registry import RegistryEntry

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(_ROOT, "docs", "reference")
_WIDTH = 100  # usage lines are wrapped at a fixed width, whatever the terminal
# Packages whose objects mkdocstrings renders from source; other plugins' components are described only.
_DOCUMENTED_PACKAGES = ("segkit", "segkit_plugins")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)

API_OBJECTS = (
    ("Configs", ["segkit.load_config"]),
    ("Models and checkpoints", ["segkit.build_model", "segkit.load_checkpoint", "segkit.load_model"]),
    ("Inference", ["segkit.Predictor"]),
    ("Export", ["segkit.export.export_model", "segkit.export.check_export"]),
    ("Training and evaluation", ["segkit.engine.runner.train", "segkit.engine.runner.evaluate"]),
)


# ------------------------------------------------------------------------------------------- text
def escape(text: str) -> str:
    """Markdown for plain text that may hold code spans: the spans stay, the rest is escaped."""
    parts, last = [], 0
    for match in _CODE_SPAN.finditer(text):
        parts.append(_escape_plain(text[last:match.start()]))
        parts.append(match.group(0))
        last = match.end()
    parts.append(_escape_plain(text[last:]))
    return "".join(parts)


def _escape_plain(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\*_\[\]|#])", r"\\\1", text)


def own_docstring(obj: object) -> str:
    """``obj``'s own docstring, dedented ("" if it has none; a class does not inherit its base's here)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def first_paragraph(obj: object) -> str:
    """The first paragraph of ``obj``'s own docstring, on one line."""
    return " ".join(own_docstring(obj).split("\n\n")[0].split())


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


# -------------------------------------------------------------------------------------------- CLI
def iter_commands() -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Every command as ``(name, one-line help, parser)``, depth first: ``segkit``, ``segkit train``, ...,
    ``segkit data check``, ``segkit convert voc2coco``."""
    root = build_parser()
    yield "segkit", "", root
    yield from _sub_commands("segkit", root)


def _sub_commands(prefix: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield f"{prefix} {name}", helps.get(name) or "", sub
            yield from _sub_commands(f"{prefix} {name}", sub)
            if f"{prefix} {name}" == "segkit convert":
                for conv_name, conv in dataset_converter_parsers().items():
                    yield f"segkit convert {conv_name}", first_sentence(conv.description), conv


def first_sentence(text: str | None) -> str:
    text = _one_line(text)
    return text.split(". ")[0].rstrip(".") if text else ""


def documented_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a page lists: all but ``-h`` and the sub-command selector."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _usage(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=_WIDTH)
    return parser.format_usage().strip()


def _argument_item(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = functools.partial(argparse.HelpFormatter, width=_WIDTH)(parser.prog)
    invocation = formatter._format_action_invocation(action)
    help_text = _one_line(formatter._expand_help(action)) if action.help else ""
    notes = []
    default = action.default
    if (action.option_strings and default not in (None, False, argparse.SUPPRESS, [])
            and "default" not in help_text):
        notes.append(f"default `{default}`")
    suffix = f" ({', '.join(notes)})" if notes else ""
    prefix = "**Required.** " if action.option_strings and action.required else ""
    return f"`{invocation}`\n:   {prefix}{escape(help_text)}{suffix}\n"


def cli_page() -> str:
    lines = ["# Command line", "",
             "Every `segkit` command and its options, generated from the command's own parsers "
             "(`segkit COMMAND --help` prints the same).", ""]
    for name, summary, parser in iter_commands():
        level = "##" if name.count(" ") <= 1 else "###"
        lines += [f"{level} `{name}`", ""]
        if summary:
            lines += [f"*{escape(summary[0].upper() + summary[1:].rstrip('.'))}.*", ""]
        if parser.description:
            lines += [escape(_one_line(parser.description)), ""]
        lines += ["```text", _usage(parser), "```", ""]
        lines += [_argument_item(parser, action) for action in documented_arguments(parser)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- components
def _documented(entry: RegistryEntry) -> str | None:
    """The dotted path mkdocstrings renders ``entry`` from, or None if it is not one of segkit's own."""
    obj = entry.obj
    module, qualname = getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")
    if not module.startswith(_DOCUMENTED_PACKAGES) or "<" in qualname:
        return None
    try:
        found = functools.reduce(getattr, qualname.split("."), sys.modules[module])
    except (KeyError, AttributeError):
        return None
    return f"{module}.{qualname}" if found is obj else None


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-{name}".lower()


def _component_section(kind: str, entry: RegistryEntry) -> list[str]:
    lines = [f"### {entry.name} {{ #{_anchor(kind, entry.name)} }}", "",
             "```python", f"{entry.name}{component_signature(entry.obj, max_length=None)}", "```", "",
             f"Registered by `{component_source(entry)}`.", ""]
    path = _documented(entry)
    if path is None:
        return lines + [escape(first_paragraph(entry.obj)), ""]
    return lines + [f"::: {path}", "    options:", "      show_root_heading: false",
                    "      show_root_toc_entry: false", "      members: false", "      heading_level: 4", ""]


def components_page() -> str:
    components = list_components()
    lines = ["# Components",
             "",
             "Every registered component by registry, as `segkit list` shows them: the name a config's "
             "`type:` takes, the signature (the keyword arguments a config may set), the module that "
             "registered it and its documentation. Beyond the transforms listed here, every "
             "albumentations transform is available by its class name (`segkit list transforms --all`).",
             ""]
    for kind, entries in components.items():
        lines += [f"- [{kind.capitalize()}](#{kind}): " + ", ".join(
            f"[{e.name}](#{_anchor(kind, e.name)})" for e in entries)]
    lines.append("")
    for kind, entries in components.items():
        lines += [f"## {kind.capitalize()} {{ #{kind} }}", "", "| name | summary |", "| --- | --- |"]
        lines += [f"| [{e.name}](#{_anchor(kind, e.name)}) | {escape(first_paragraph(e.obj))} |" for e in entries]
        lines.append("")
        for entry in entries:
            lines += _component_section(kind, entry)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- API
def api_page() -> str:
    lines = ["# Python API", "",
             "What scripts and notebooks use; the command line is a thin layer over it. "
             "`import segkit` gives `load_config`, `build_model`, `load_checkpoint`, `load_model` and "
             "`Predictor`; export and training live in `segkit.export` and `segkit.engine.runner`.", ""]
    for title, paths in API_OBJECTS:
        lines += [f"## {title}", ""]
        for path in paths:
            lines += [f"::: {path}", "    options:", "      heading_level: 3", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- architectures
ARCHITECTURE_CONFIGS = (
    ("PANet R50-FPN", "configs/panet_r50_fpn_coco.yaml"),
    ("RetinaNet R50-FPN", "configs/retinanet_r50_fpn_coco.yaml"),
    ("FCOS R50-FPN", "configs/fcos_r50_fpn_coco.yaml"),
    ("SSD300 VGG-16", "configs/ssd300_vgg16_coco.yaml"),
    ("YOLO-style head on R50-PAFPN", "configs/yolo_r50_pafpn_coco.yaml"),
    ("Mask R-CNN ViT-B/16 + simple feature pyramid (ViTDet)", "configs/mask_rcnn_vit_b_simple_fpn_coco.yaml"),
    ("EncNet R50-D8", "configs/encnet_r50_d8_voc.yaml"),
    ("DeepLabV3 R50-D8", "configs/deeplabv3_r50_d8_voc.yaml"),
    ("DeepLabV3+ R50 (output stride 16)", "configs/deeplabv3plus_r50_d16_voc.yaml"),
    ("U-Net", "configs/unet_camvid.yaml"),
)
# Random weights are enough to describe a model; no weight file is read.
_ARCHITECTURE_OVERRIDES = ["model.backbone.pretrained=null"]


def _count(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def _module_rows(model) -> list[str]:
    rows = ["| module | type | parameters |", "| --- | --- | ---: |"]
    for name, child in model.named_children():
        rows.append(f"| **`{name}`** | **`{type(child).__name__}`** | **{_count(child)}** |")
        rows += [f"| `{name}.{sub_name}` | `{type(sub).__name__}` | {_count(sub)} |"
                 for sub_name, sub in child.named_children()]
    return rows


def _shape_rows(model) -> list[str]:
    lines = []
    for name, child in model.named_children():
        if not callable(getattr(child, "output_shape", None)):
            continue
        lines += [f"`{name}.output_shape()`:", "", "| feature | channels | stride |", "| --- | ---: | ---: |"]
        lines += [f"| `{feature}` | {spec.channels} | {spec.stride} |"
                  for feature, spec in child.output_shape().items()]
        lines.append("")
    return lines


def architecture_section(title: str, config: str) -> list[str]:
    """The modules, parameter counts and feature shapes of the model ``config`` builds."""
    import segkit

    model = segkit.build_model(segkit.load_config(os.path.join(_ROOT, config), _ARCHITECTURE_OVERRIDES))
    return [f"## {title}", "",
            f"`{config}` with `{' '.join(_ARCHITECTURE_OVERRIDES)}`: model type `{type(model).__name__}`, "
            f"{_count(model)} parameters.", "", *_module_rows(model), "", *_shape_rows(model)]


def architectures_page() -> str:
    lines = ["# Architectures", "",
             "Models as segkit builds them from shipped configs: every top-level module with its direct "
             "children and their parameter counts, and the feature maps the backbone and the neck "
             "declare (`output_shape()`: name, channels, stride). Generated from the code by "
             "`tools/gen_docs.py`.", ""]
    for title, config in ARCHITECTURE_CONFIGS:
        lines += architecture_section(title, config)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
PAGES = {"cli.md": cli_page, "components.md": components_page, "api.md": api_page,
         "architectures.md": architectures_page}


def write_pages(out_dir: str = DEFAULT_OUT) -> list[str]:
    """Write every generated page into ``out_dir`` (created if needed); returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, make in PAGES.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(make().rstrip() + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write the pages into (default docs/reference)")
    args = parser.parse_args(argv)
    for path in write_pages(args.out):
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
