"""The ``segkit`` command.

    segkit train CONFIG [key=value ...] [--resume CKPT]
    segkit eval CONFIG_OR_CKPT [CKPT] [key=value ...] [--split val|test] [--out FILE] [--results PATH]
                [--show DIR [--show-count N]]
    segkit predict CONFIG_OR_CKPT [CKPT] (INPUT... | --split val|test) [key=value ...] --out DIR [--score-thr F]
                [--device D]
    segkit list [KIND]
    segkit config CONFIG [key=value ...]
    segkit data check CONFIG [key=value ...] [--split train|val|test|all] [--max-images N]
    segkit data show CONFIG [key=value ...] --out DIR [--split S] [--n N] [--seed S] [--grid]
    segkit score --task bbox|segm|voc|semseg --gt GT --pred PRED [--out FILE] [options]
    segkit score --config CONFIG_OR_CKPT [--override key=value ...] [--split val|test] --pred PRED [--task T]
    segkit plot WORK_DIR [--out FILE.png]
    segkit bench CONFIG [key=value ...] [--compare torchvision] [--image-size HxW] [--out FILE] [options]
    segkit convert --from timm|torchvision IN OUT
    segkit convert voc2coco VOC_ROOT [VOC_ROOT ...] --split NAME [--split NAME ...] --out FILE
    segkit convert coco2voc ANN_FILE IMG_DIR OUT_ROOT --split NAME

``predict`` draws each image's results as DIR/<image name>.png; a detector also writes its
detections as COCO results (DIR/predictions.json), a semantic segmentor its label maps
(DIR/labels/<image name>.png, pixel = class index). ``eval --results`` writes the evaluation's
predictions in the dataset's ids, which ``score --config`` scores to the numbers eval printed.

User errors (a bad config, a missing file, a checkpoint that does not fit) print one paragraph and
exit with status 2; ``--debug`` shows the traceback instead.

This module parses and dispatches; each command's work lives in :mod:`segkit.commands` (``run``:
train and eval, ``images``: predict, export and cam, ``inspection``: list, config, data and plot,
``score``, ``convert``, ``bench``), and each of those adds its own sub-command parsers.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from segkit.commands import bench, convert, images, inspection, run, score
from segkit.commands.convert import DATASET_CONVERTERS, dataset_converter_parsers
from segkit.commands.inspection import component_signature, component_source, list_components
from segkit.errors import UserError

__all__ = ["build_parser", "component_signature", "component_source", "dataset_converter_parsers", "list_components",
           "main"]

# The order of `segkit --help`.
_COMMAND_MODULES = (run, images, inspection, score, convert, bench)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``segkit`` command and its sub-commands (``convert voc2coco`` and ``convert coco2voc``
    have their own: :func:`dataset_converter_parsers`); each parsed command carries its ``handler``."""
    parser = argparse.ArgumentParser(prog="segkit", description="Detection and segmentation with plugins.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segkit ARGV`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if a != "--debug"]
    if len(words) >= 2 and words[0] == "convert" and words[1] in DATASET_CONVERTERS:
        # `segkit convert voc2coco ...`: a dataset converter with its own options.
        converter = DATASET_CONVERTERS[words[1]]
        try:
            return converter(words[2:])
        except (UserError, FileNotFoundError) as exc:
            if "--debug" in argv:
                raise
            _fail(str(exc))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_peer_disconnects()
    try:
        return args.handler(args) or 0
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        _fail(str(exc))
    except Exception as exc:
        # The worker's death may surface wrapped in whatever the main process was doing at that moment.
        from segkit.engine.workdir import worker_death

        death = worker_death(exc)
        if args.debug or death is None:
            raise
        _fail(f"a data-loading worker process died ({death}). The operating system ends a worker that runs out of "
              f"memory, and a crash in a dataset's or transform's native code ends it too. Rerun with "
              f"data.num_workers=0 to see the error in the main process, or with fewer workers or a smaller "
              f"data.batch_size if memory is short; a training run continues with --resume auto.")
    except KeyboardInterrupt:
        print("segkit: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        # Lightning ends training after a SIGTERM (cluster schedulers send it before killing a job) by
        # raising SIGTERMException, a SystemExit without a status: exit as a process ended by SIGTERM does.
        lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
        if lightning is None or not isinstance(exc, lightning.SIGTERMException):
            raise
        print("segkit: stopped by SIGTERM", file=sys.stderr)
        return 128 + 15
    return 0


def _quiet_peer_disconnects() -> None:
    """Keep a dead worker's broken connections out of the output of the process that reports its death.

    When a DataLoader worker is killed while it hands a tensor over, multiprocessing's resource-sharing
    thread in the main process sees the connection reset and prints that through ``sys.excepthook``
    before the main thread can report the death in one paragraph. Connection errors raised in helper
    threads are dropped here; everything else still reaches the original hook.
    """
    import threading

    original = sys.excepthook

    def hook(exc_type, exc, tb):
        if threading.current_thread() is not threading.main_thread() and issubclass(exc_type,
                                                                                    (ConnectionError, EOFError)):
            return
        original(exc_type, exc, tb)

    sys.excepthook = hook


def _version() -> str:
    """``segkit X.Y.Z`` with the versions of torch and torchvision it runs on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    from segkit import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"segkit {__version__} (torch {installed('torch')}, torchvision {installed('torchvision')})"


def _fail(message: str) -> None:
    text = textwrap.fill(f"segkit: error: {message}", width=100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    print(text + "\n(run with --debug to see the traceback)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
