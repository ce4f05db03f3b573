"""The code blocks of the documentation site work: each page runs from top to bottom as a reader would
follow it, and every `segkit` command line of every page parses, with the configs it names existing
and loading.

A page runs in a temporary working directory where ``configs/`` resolves, block after block:

* ```python blocks run in one namespace, except one whose first line is a file-name comment
  (``# my_plugin/backbones.py``): it is written to that file and imported as a config's ``imports:``
  would;
* a ```yaml block whose first line is a file-name comment (``# my_detector.yaml``) is written to that
  file and loaded with :func:`segkit.load_config`; another YAML block must parse, and load as a
  config when it has a ``_base_``;
* every `segkit` command of a ```bash / ```console / ```sh block runs (in this process; a DDP run in
  a process of its own) and must exit with status 0. Training commands are shortened: one epoch of
  two batches, validation on two batches, and 16 training / 8 validation images of Shapes data; the
  rest of the command is run as written. Lines with placeholders (``CONFIG``, ``IMAGES...``) are
  parsed, not run.

The weight names a page uses (``torchvision://...``, ``timm://...``, written in its blocks or named by
a packaged config they base on) are randomly initialised stand-ins of the named models, planted in
torch.hub's and Hugging Face's caches under the test's folder, offline.

A checkpoint ``work_dirs/.../*.ckpt`` that a block names before any command of the page wrote it is
an untrained tiny model (a segmentor when the path names one). A block preceded by
``<!-- docs-test: skip REASON -->`` is not run (its segkit commands are still parsed); skipped
blocks and lines are reported as ``SkippedDocExample`` warnings.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import build_parser, dataset_converter_parsers
from segkit.registry import import_modules
from tests.weight_cache import offline_caches, plant_standin

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# docs/examples/ is a Python distribution, not pages; docs/reference/ is generated from the code.
EXCLUDED = ("examples", "reference")
SHELL_LANGUAGES = ("bash", "console", "sh", "shell")
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
CHECKPOINT = re.compile(r"work_dirs/[\w./-]+?\.ckpt")
CONFIG_PATH = re.compile(r"(?<![\w/.-])configs/[\w./-]+?\.ya?ml")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]+")
CLASSES = ["circle", "square", "triangle"]
MASK_HEAD = "model.roi_head.mask_head={type: MaskRCNNHead, num_convs: 1, conv_dim: 8}"


class SkippedDocExample(UserWarning):
    """A documentation example the test does not run (the message says where and why)."""


@dataclass(frozen=True)
class Block:
    page: str       # path relative to docs/
    line: int       # line of the opening fence, from 1
    language: str
    code: str
    skip: str | None  # the reason given in a preceding skip comment


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in EXCLUDED)


def extract_blocks(path: Path, *, docs: Path = DOCS) -> list[Block]:
    """Every fenced code block of a Markdown page under ``docs``, with the skip reason of the comment before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, language = match.groups()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[index + 1:end]]
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        mark = SKIP_MARK.search(previous)
        blocks.append(Block(str(path.relative_to(docs)), index + 1, language.lower(), "\n".join(body) + "\n",
                            (mark.group(1) or "no reason given") if mark else None))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in pages() for block in extract_blocks(page)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in SHELL_LANGUAGES]


def _report_skip(message: str) -> None:
    warnings.warn(message, SkippedDocExample, stacklevel=2)


# ------------------------------------------------------------------------------------ fixtures
def _save_tiny_checkpoint(path: Path, work: Path, *, masks: bool) -> None:
    from tests.conftest import TINY_CONFIG

    cfg_path = work / "tiny.yaml"
    cfg_path.write_text(TINY_CONFIG.format(root=work / "data", work_dir=work / "run"))
    overrides = ["model.roi_head.score_threshold=0.0", *([MASK_HEAD] if masks else [])]
    _save_untrained(path, segkit.load_config(cfg_path, overrides), CLASSES)


def _save_untrained(path: Path, cfg: dict, classes: list[str]) -> None:
    """A checkpoint of ``cfg``'s model with its seed-0 initial weights, as `segkit train` would save one."""
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg)), CLASSES_KEY: classes},
               path)


# --------------------------------------------------------------------------------- shell blocks
def command_lines(code: str) -> list[str]:
    """The block's logical lines (continuations joined); of a console session (``$`` prompts) only the
    command lines, without the prompt."""
    joined, current = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        joined.append((current + line.strip()).strip())
        current = ""
    if current:
        joined.append(current.strip())
    if any(line.startswith("$ ") for line in joined):  # a console session: the rest is output
        return [line[2:] for line in joined if line.startswith("$ ")]
    return joined


def segkit_arguments(line: str) -> list[str] | None:
    """The arguments after ``segkit`` (or ``-m segkit.cli``) on a command line, None if it runs no segkit."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None if "segkit" not in line.split("#")[0] else ["<unparsable shell line>"]
    for index, word in enumerate(words):
        if word == "segkit" or word.endswith("/segkit") or (word == "segkit.cli" and words[index - 1:index] == ["-m"]):
            return words[index + 1:]
    return None


def _placeholders(word: str) -> list[str]:
    """Capitalised placeholder names in a word: CONFIG, CKPT, IMAGES..., PATH.ckpt, WORK_DIR/x."""
    parts = re.split(r"[/=,]", word)
    names = []
    for part in parts:
        stem = part.rstrip(".").split(".")[0]
        if PLACEHOLDER.fullmatch(stem):
            names.append(stem)
    return names


@pytest.fixture(scope="module")
def substitutes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("docs-shell")
    checkpoint = root / "tiny.ckpt"
    _save_tiny_checkpoint(checkpoint, root, masks=False)
    image = root / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    return {"CONFIG": str(ROOT / "configs" / "quickstart.yaml"), "CKPT": str(checkpoint), "PATH": str(checkpoint),
            "IMAGES": str(image), "IMAGE": str(image), "DIR": str(root / "out"), "WORK_DIR": str(root / "run"),
            "FILE": str(root / "file.out"), "OUT": str(root / "file.out")}


def substitute(words: list[str], substitutes: dict[str, str]) -> list[str] | None:
    """The words with every placeholder replaced, None if one has no substitute."""
    out = []
    for word in words:
        names = _placeholders(word)
        if not names:
            out.append(word)
            continue
        if any(name not in substitutes for name in names) or len(names) > 1:
            return None
        out.append(substitutes[names[0]])
    return out


def _parse(arguments: list[str]) -> str | None:
    """None if ``segkit ARGUMENTS`` parses, else argparse's message."""
    converters = dataset_converter_parsers()
    if len(arguments) >= 2 and arguments[0] == "convert" and arguments[1] in converters:
        parser, rest = converters[arguments[1]], arguments[2:]
    else:
        parser, rest = build_parser(), arguments
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(rest)
    except SystemExit as exc:
        return stderr.getvalue().strip() or f"exit status {exc.code}"
    return None


# ----------------------------------------------------------------------------------- whole pages
def _ensure_checkpoints(text: str, fixtures: Path) -> None:
    """The checkpoints ``text`` names that nothing has written yet: untrained tiny models."""
    for name in sorted(set(CHECKPOINT.findall(text))):
        path = Path(name)
        if path.exists():
            continue
        if "seg" in name:
            cfg = segkit.load_config(ROOT / "configs" / "quickstart_seg.yaml")
            _save_untrained(path, cfg, ["background", *CLASSES])
        else:
            work = fixtures / path.parent.as_posix().replace("/", "_")
            work.mkdir(parents=True, exist_ok=True)
            _save_tiny_checkpoint(path, work, masks="mask" in name)


WEIGHT_NAME = re.compile(r"\b(?:torchvision|timm)://[\w.]+")
PACKAGED_NAME = re.compile(r"segkit://([\w/]+)|(?<![\w/.-])configs/([\w/]+)\.ya?ml")


def weight_names(blocks: list[Block]) -> set[str]:
    """The weight names the page's runnable blocks use: written in them, or named by the packaged
    configs they base on (``segkit://encnet_r50_d8_voc`` names timm's resnet50c)."""
    text = "\n".join(b.code for b in blocks if _runnable(b))
    names = set(WEIGHT_NAME.findall(text))
    for match in PACKAGED_NAME.finditer(text):
        config = segkit.load_config(f"segkit://{match.group(1) or match.group(2)}", import_plugins=False)
        pretrained = ((config.get("model") or {}).get("backbone") or {}).get("pretrained")
        if isinstance(pretrained, str) and WEIGHT_NAME.fullmatch(pretrained):
            names.add(pretrained)
    return names


def _prepare_workdir(workdir: Path) -> Path:
    """What the examples take for granted: the configs and a photo. Returns a folder for fixtures."""
    (workdir / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    fixtures = workdir.parent / f"{workdir.name}-fixtures"
    fixtures.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(workdir / "photo.jpg")
    return fixtures


def file_name(block: Block) -> str | None:
    """``name.yaml`` (or ``.py``) when the block's first line is the comment ``# name.yaml``."""
    first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
    match = re.fullmatch(r"#\s*([\w./-]+\.(?:ya?ml|py))\s*", first)
    return match.group(1) if match else None


def _write(block: Block, name: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.code, encoding="utf-8")
    return path


def _runs_segkit(block: Block) -> bool:
    return any(segkit_arguments(line) is not None for line in command_lines(block.code))


def _runnable(block: Block) -> bool:
    return block.skip is None and (block.language in ("python", "py", "yaml", "yml")
                                   or (block.language in SHELL_LANGUAGES and _runs_segkit(block)))


RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if _runnable(b)})
SHORT_TRAINING = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
                  "trainer.check_val_every_n_epoch=1"]


def shortened(arguments: list[str]) -> list[str]:
    """A ``segkit train`` command cut to a few steps (Shapes data cut to a few images); others as given."""
    if arguments[:1] != ["train"]:
        return arguments
    positional = [a for a in arguments[1:] if not a.startswith("-") and "=" not in a]
    overrides = [a for a in arguments[1:] if "=" in a and not a.startswith("-")]
    extra = list(SHORT_TRAINING)
    if positional:
        cfg = segkit.load_config(positional[0], overrides)
        data = cfg.get("data") or {}
        for split, count in (("train", 16), ("val", 8)):
            if (data.get(split) or {}).get("type") == "Shapes":
                extra.append(f"data.{split}.num_images={count}")
    return [*arguments, *extra]


def run_segkit(arguments: list[str]) -> tuple[int, str]:
    """Run ``segkit ARGUMENTS``; returns the exit status and the output. DDP runs get a process of their own."""
    from segkit.cli import main

    if any(a.startswith("trainer.strategy=ddp") for a in arguments):
        done = subprocess.run([sys.executable, "-m", "segkit.cli", *arguments], capture_output=True, text=True,
                              timeout=600)
        return done.returncode, done.stdout + done.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = main(arguments)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - reported with the command
            import traceback

            traceback.print_exc()
            status = 1
    return int(status or 0), out.getvalue()


def _run_yaml(block: Block) -> None:
    name = file_name(block)
    if name is not None:
        segkit.load_config(_write(block, name))
        return
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and "_base_" in data:
        segkit.load_config(_write(block, f"_docs_block_{block.line}.yaml"))


def _run_shell(block: Block, where: str, fixtures: Path, substitutes: dict[str, str]) -> None:
    for line in command_lines(block.code):
        arguments = segkit_arguments(line)
        if arguments is None:
            if line and not line.startswith("#"):
                _report_skip(f"{where}: not a segkit command, not run: {line}")
            continue
        if substitute(arguments, substitutes) != arguments:  # placeholders: parsed by the test below
            _report_skip(f"{where}: has placeholders, not run: {line}")
            continue
        _ensure_checkpoints(line, fixtures)
        command = shortened(arguments)
        status, output = run_segkit(command)
        if status != 0:
            pytest.fail(f"{where}: `segkit {' '.join(command)}` exited with {status}:\n{output[-4000:]}")


# Pages whose commands the default suite runs elsewhere: the two-process DDP training of multi_gpu.md is
# test_distributed.py's (which also compares its evaluation with one process); the COCO-format and
# label-map walk-throughs train, evaluate and score as fine_tuning.md does, which stays in the default suite.
SLOW_PAGES = {"tutorials/multi_gpu.md", "tutorials/custom_coco.md", "tutorials/custom_semseg.md", "tutorials/fine_tuning.md"}


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in RUN_PAGES])
def test_page_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, substitutes: dict[str, str]):
    blocks = [b for b in ALL_BLOCKS if b.page == page]
    workdir = tmp_path / "work"
    workdir.mkdir()
    fixtures = _prepare_workdir(workdir)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path / "segkit-data"))
    # the weights the page names: random stand-ins where the libraries look, nothing downloaded
    offline_caches(tmp_path / "caches", monkeypatch)
    for name in sorted(weight_names(blocks)):
        plant_standin(name)
    namespace: dict = {"__name__": f"docs_example_{Path(page).stem}"}
    for block in blocks:
        where = f"docs/{block.page}:{block.line}"
        if block.skip is not None:
            _report_skip(f"{where}: {block.language} block not run: {block.skip}")
            continue
        name = file_name(block)
        try:
            if block.language in ("python", "py") and name:  # a plugin file: saved, then imported
                import_modules([str(_write(block, name).resolve())])
            elif block.language in ("python", "py"):
                _ensure_checkpoints(block.code, fixtures)
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - the documentation's own code
            elif block.language in ("yaml", "yml"):
                _run_yaml(block)
            elif block.language in SHELL_LANGUAGES:
                _run_shell(block, where, fixtures, substitutes)
        except pytest.fail.Exception:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported with the block
            pytest.fail(f"{where}: the {block.language} block raised {type(exc).__name__}: {exc}\n{block.code}")


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[f"{b.page}:{b.line}" for b in SHELL_BLOCKS])
def test_segkit_command_lines_parse(block: Block, substitutes: dict[str, str]):
    where = f"docs/{block.page}:{block.line}"
    problems = []
    for line in command_lines(block.code):
        arguments = segkit_arguments(line)
        if arguments is None:
            continue
        for config in CONFIG_PATH.findall(" ".join(arguments)):
            if not (ROOT / config).is_file():
                problems.append(f"{config} does not exist: {line}")
                continue
            segkit.load_config(ROOT / config)
        resolved = substitute(arguments, substitutes)
        if resolved is None:
            _report_skip(f"{where}: not parsed, a placeholder has no substitute: segkit {' '.join(arguments)}")
            continue
        error = _parse(resolved)
        if error:
            problems.append(f"`{line}`: {error}")
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


def test_the_extractor_finds_the_examples(tmp_path: Path):
    """Guards the extraction itself: the pages have python and shell blocks, skip marks are read."""
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- docs-test: skip needs a GPU -->\n```python\nx = 1\n```\n\n"
                    "- item\n\n    ```bash\n    segkit list\n    ```\n", encoding="utf-8")
    skipped, shell = extract_blocks(page, docs=tmp_path)
    assert (skipped.language, skipped.line, skipped.code, skipped.skip) == ("python", 4, "x = 1\n", "needs a GPU")
    assert (shell.language, shell.code, shell.skip) == ("bash", "segkit list\n", None)
    assert "tutorials/custom_coco.md" in RUN_PAGES and SHELL_BLOCKS
    assert segkit_arguments("srun segkit train configs/quickstart.yaml x=1  # note") == [
        "train", "configs/quickstart.yaml", "x=1"]
    assert segkit_arguments("torchrun --nnodes=2 -m segkit.cli eval CKPT") == ["eval", "CKPT"]
    assert command_lines("segkit train a \\\n    b=1\nsegkit list\n") == ["segkit train a b=1", "segkit list"]
    assert command_lines("$ segkit list\n...\nResNet  segkit.models\n") == ["segkit list"]
    assert _placeholders("IMAGES...") == ["IMAGES"] and _placeholders("PATH.ckpt") == ["PATH"]
    assert _placeholders("VOCdevkit/VOC2007") == [] and _placeholders("model.backbone.pretrained=null") == []
    assert _parse(["train", "configs/quickstart.yaml"]) is None
    assert "--out" in _parse(["predict", "model.ckpt", "a.png"])                # a required option missing
    assert _parse(["convert", "coco2voc", "a.json", "images", "out"]) is not None   # --split missing
