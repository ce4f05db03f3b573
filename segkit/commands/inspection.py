"""`segkit list`, `segkit configs`, `segkit config`, `segkit data` and `segkit plot`: looking at components,
configs, data and runs."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from segkit.commands.common import add_config_arguments
from segkit.errors import ConfigError, UserError
from segkit.registry import RegistryEntry

__all__ = ["add_parsers", "component_signature", "component_source", "list_components"]


def add_parsers(sub: Any) -> None:
    """Add the parsers of ``segkit list``, ``configs``, ``config``, ``data`` and ``plot`` to ``sub`` (the ``segkit``
    parser's sub-parsers)."""
    _add_list_parser(sub)
    _add_configs_parser(sub)
    _add_config_parser(sub)
    _add_data_parser(sub)
    _add_plot_parser(sub)


def _add_list_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list registered components",
                       description="List every registered component, where it comes from and its signature.")
    p.add_argument("kind", nargs="?", help="backbones, necks, heads, models, datasets, transforms, evaluators or converters")
    p.add_argument("--all", action="store_true", help="also list every albumentations transform")
    p.set_defaults(handler=_cmd_list)


def _add_configs_parser(sub: Any) -> None:
    p = sub.add_parser("configs", help="list the configs shipped with segkit, or copy one to edit",
                       description="The configs shipped with segkit work by name from any folder (`segkit train "
                                   "quickstart`, `_base_: [segkit://_base_/models/mask_rcnn_r50_fpn.yaml]`). "
                                   "`segkit configs` lists them; `segkit configs copy NAME [DEST]` writes one "
                                   "next to you for editing, its _base_ entries naming the packaged files.")
    p.add_argument("--all", action="store_true", help="also list the _base_ files")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    q = actions.add_parser("list", help="list the packaged configs (the default)",
                           description="List the configs shipped with segkit: the name each command takes and the "
                                       "first sentence of its comment; --all adds the _base_ files.")
    q.add_argument("--all", action="store_true", help="also list the _base_ files")
    q = actions.add_parser("copy", help="copy a packaged config to edit it",
                           description="Write the packaged config NAME to DEST (default ./NAME.yaml; a folder: "
                                       "DEST/NAME.yaml) with its relative _base_ entries rewritten as "
                                       "segkit://NAME, so the copy works where it lies.")
    q.add_argument("name", metavar="NAME", help="a packaged config (`segkit configs` lists them)")
    q.add_argument("dest", metavar="DEST", nargs="?", help="the file or folder to write (default ./NAME.yaml)")
    q.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(handler=_cmd_configs)


def _add_config_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="print the merged config",
                       description="Print CONFIG after _base_ merging, overrides and interpolation. With --check, "
                                   "also check every value as `segkit train` does before it reads data (sections, "
                                   "ranges, the trainer's accelerator, the evaluator's main_metric, the model's "
                                   "components) and exit 2 naming the first problem.")
    add_config_arguments(p)
    p.add_argument("--check", action="store_true", help="check every value and build the model (imports the "
                   "config's imports:), reading no data")
    p.set_defaults(handler=_cmd_config)


def _add_data_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="check a config's datasets, or draw their samples",
                       description="`segkit data check` reads every split of CONFIG (images, annotations, label "
                                   "maps) and lists each problem found; exit status 1 if any is an error. "
                                   "`segkit data show` draws samples after the split's transforms, as the model "
                                   "sees them.")
    data = p.add_subparsers(dest="action", metavar="ACTION")
    data.required = True
    q = data.add_parser("check", help="find every problem in a config's datasets",
                        description="Check every split of CONFIG: missing, corrupt or resized images, boxes outside "
                                    "the image or of zero size, unknown categories, masks that disagree with their "
                                    "box, label-map values outside the classes and label maps of the wrong size; "
                                    "images without annotations are warnings. Prints the count and first records of "
                                    "each problem and a summary; exit status 0 if no errors, 1 otherwise.")
    add_config_arguments(q)
    q.add_argument("--split", choices=("train", "val", "test", "all"), default="all",
                   help="the split to check (default: every split the config defines)")
    q.add_argument("--max-images", type=int, metavar="N", help="check only the first N images of each split")
    q.add_argument("--class-weights", action="store_true",
                   help="also print the median-frequency class weights of the train split's label maps, as a "
                        "class_weight: list for a segmentation loss (`loss: {type: CrossEntropy, class_weight: "
                        "...}`)")
    q = data.add_parser("show", help="draw samples after the transforms",
                        description="Draw N random samples of a split after its transforms: boxes with class names "
                                    "and masks, or the label map coloured by class with a legend. Writes "
                                    "DIR/<image id>.png (label-map datasets: DIR/<image name>.png) and, with "
                                    "--grid, a contact sheet DIR/grid.png.")
    add_config_arguments(q)
    q.add_argument("--split", choices=("train", "val", "test"), default="train", help="default train")
    q.add_argument("--n", type=int, default=16, metavar="N", help="number of samples (default 16)")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="chooses the samples and their random "
                   "transforms (default 0)")
    q.add_argument("--grid", action="store_true", help="also write all samples as one picture, DIR/grid.png")
    p.set_defaults(handler=_cmd_data)


def _add_plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw the training curves of a run as a PNG",
                       description="Read WORK_DIR/logs/version_*/metrics.csv (every run in the folder, in order, so "
                                   "a resumed run's curves continue) and draw one panel per training loss (lightly "
                                   "smoothed), the learning rate, the seconds per iteration and the evaluation "
                                   "metrics against the step.")
    p.add_argument("work_dir", metavar="WORK_DIR", help="the run's folder (the config's work_dir)")
    p.add_argument("--out", metavar="FILE.png", help="the picture to write (default WORK_DIR/curves.png)")
    p.set_defaults(handler=_cmd_plot)


def list_components(kind: str | None = None) -> dict[str, list[RegistryEntry]]:
    """The registered components, by plural kind name, as ``segkit list [KIND]`` shows them.

    Args:
        kind: one kind (``"backbones"`` or ``"backbone"``), or None for every registry.

    Returns:
        ``{kind: entries sorted by name}``; albumentations transforms reached by class name only are not
        entries.

    Raises:
        ConfigError: ``kind`` is not a kind of component (with the nearest kind).
    """
    from segkit.registry import all_registries

    registries = all_registries()
    kinds = list(registries)
    if kind:
        plural = kind if kind in registries else kind + "s"
        if plural not in registries:
            from segkit.errors import did_you_mean

            raise ConfigError(f"unknown component kind '{kind}'." + (did_you_mean(kind, kinds)
                                                                    or f" Kinds: {', '.join(kinds)}."))
        kinds = [plural]
    return {name: registries[name].entries() for name in kinds}


def component_source(entry: RegistryEntry) -> str:
    """Where a component was registered: its module, and the plugin (entry point) that loaded it."""
    return entry.module + (f" (plugin {entry.plugin})" if entry.plugin else "")


def component_signature(obj: object, *, max_length: int | None = 160) -> str:
    """A component's constructor arguments with their defaults, ``(depth=50, ...)``, cut to ``max_length``
    characters (None: never cut)."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    params = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
              for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    text = "(" + ", ".join(params) + ")"
    return text if max_length is None or len(text) <= max_length else text[:max_length - 3] + "...)"


def _cmd_list(args: argparse.Namespace) -> int:
    from segkit.registry import TRANSFORMS, plugin_errors

    for kind, entries in list_components(args.kind).items():
        print(f"{kind}:")
        for entry in entries:
            print(f"  {entry.name:<22} {component_signature(entry.obj)}\n  {'':<22} from {component_source(entry)}")
        if kind == "transforms":
            extra = [n for n in TRANSFORMS.names(include_fallback=True) if n not in TRANSFORMS.names()]
            if args.all:
                for name in extra:
                    print(f"  {name:<22} (albumentations)")
            else:
                print(f"  ... and {len(extra)} albumentations transforms by class name (segkit list transforms --all)")
    errors = plugin_errors()
    if errors:
        print("plugins that failed to import:")
        for err in errors:
            print(f"  {err.source} ({err.module}): {err.error}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from segkit.config_files import copy_config, packaged_configs, packaged_dir

    if args.action == "copy":
        dest = copy_config(args.name, args.dest, force=args.force)
        print(f"wrote {dest}; train with `segkit train {dest}`")
        return 0
    import shutil

    configs = packaged_configs(bases=args.all)
    width = max(len(c.name) for c in configs)
    room = max(40, shutil.get_terminal_size((120, 24)).columns - width - 4)
    print(f"configs shipped with segkit ({packaged_dir()}); use them by name, e.g. `segkit train quickstart`:")
    for config in configs:
        text = config.description if len(config.description) <= room else config.description[:room - 3] + "..."
        print(f"  {config.name:<{width}}  {text}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from segkit.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides, import_plugins=args.check)
    if args.check:
        from segkit.api import build_model
        from segkit.engine.config_check import check_run_config

        check_run_config(cfg)
        model = build_model(cfg)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{args.config}: every value checked; the model builds ({type(model).__name__}, {parameters:,} "
              f"parameters)")
        return 0
    print(dump_config(cfg), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from segkit.config import config_errors, load_config

    from segkit.engine.config_check import check_data_section

    cfg = load_config(args.config, args.overrides)
    check_data_section(cfg)
    if args.action == "check":
        from segkit.data.check import check_config, format_report

        if args.max_images is not None and args.max_images < 1:
            raise UserError(f"--max-images must be at least 1, got {args.max_images}.")
        with config_errors(cfg):
            reports = check_config(cfg, splits=None if args.split == "all" else [args.split],
                                   max_images=args.max_images)
        print(format_report(reports))
        failed = any(report.errors for report in reports)
        if args.class_weights:
            if failed:
                print("class weights not computed: fix the errors above first")
            else:
                with config_errors(cfg):
                    print(_class_weights_text(cfg))
        return 1 if failed else 0
    from segkit.data.show import show_samples

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}.")
    with config_errors(cfg):
        rendered = show_samples(cfg, split=args.split, num_samples=args.n, out_dir=args.out, seed=args.seed,
                                grid=args.grid)
    print(f"drew {len(rendered)} {args.split} sample(s) after the transforms into {args.out}"
          + (" (all of them in grid.png)" if args.grid else ""))
    return 0


def _class_weights_text(cfg: Any) -> str:
    """The train split's median-frequency class weights, one line per class and as a YAML list."""
    from segkit.data.class_weights import class_pixel_counts, median_frequency_weights
    from segkit.registry import DATASETS

    train = (cfg.get("data") or {}).get("train")
    if train is None:
        raise ConfigError("--class-weights reads the train split, and the config defines none", key="data.train")
    dataset = DATASETS.build(train, path="data.train")
    class_pixels, image_pixels = class_pixel_counts(dataset)
    weights = median_frequency_weights(class_pixels, image_pixels)
    names = list(getattr(dataset, "classes", None) or range(len(weights)))
    total = max(int(class_pixels.sum()), 1)
    lines = [f"median-frequency class weights of the train split ({len(dataset)} images):"]
    lines += [f"  {str(name):<20} {100 * pixels / total:6.2f}% of pixels  weight {weight:.4f}"
              for name, pixels, weight in zip(names, class_pixels, weights)]
    lines.append("class_weight: [" + ", ".join(f"{w:.4f}" for w in weights) + "]")
    return "\n".join(lines)


def _cmd_plot(args: argparse.Namespace) -> int:
    from segkit.engine.plot import plot_curves

    print(f"curves of {args.work_dir} written to {plot_curves(args.work_dir, args.out)}")
    return 0
