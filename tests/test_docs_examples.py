"""The code blocks of the documentation site work: every ```python block runs, and every `segkit` command
line in a ```bash / ```console / ```sh block parses, with the configs it names existing and loading.

Python blocks of a page run in order in one namespace, in a temporary working directory where
``configs/`` resolves and every ``work_dirs/.../*.ckpt`` the page names is an untrained tiny detector
checkpoint. A block preceded by ``<!-- docs-test: skip REASON -->`` is not run; skipped blocks and
command lines whose placeholders cannot be substituted are reported as ``SkippedDocExample`` warnings.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segkit
from segkit.checkpoint import CLASSES_KEY, CONFIG_KEY
from segkit.cli import build_parser, dataset_converter_parsers

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
PYTHON_PAGES = sorted({b.page for b in ALL_BLOCKS if b.language in ("python", "py")})
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in SHELL_LANGUAGES]


def _report_skip(message: str) -> None:
    warnings.warn(message, SkippedDocExample, stacklevel=2)


# ------------------------------------------------------------------------------------ fixtures
def _save_tiny_checkpoint(path: Path, work: Path, *, masks: bool) -> None:
    from tests.conftest import TINY_CONFIG

    cfg_path = work / "tiny.yaml"
    cfg_path.write_text(TINY_CONFIG.format(root=work / "data", work_dir=work / "run"))
    overrides = ["model.roi_head.score_threshold=0.0", *([MASK_HEAD] if masks else [])]
    cfg = segkit.load_config(cfg_path, overrides)
    torch.manual_seed(0)
    model = segkit.build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), CONFIG_KEY: json.loads(json.dumps(cfg)), CLASSES_KEY: CLASSES},
               path)


def _prepare_workdir(workdir: Path, code: str) -> None:
    """What the examples take for granted: the configs, checkpoints they name, a photo."""
    (workdir / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    fixtures = workdir.parent / f"{workdir.name}-fixtures"
    fixtures.mkdir()
    for name in sorted(set(CHECKPOINT.findall(code))):
        _save_tiny_checkpoint(workdir / name, fixtures, masks="mask" in name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(workdir / "photo.jpg")


# -------------------------------------------------------------------------------- python blocks
@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = [b for b in ALL_BLOCKS if b.page == page and b.language in ("python", "py")]
    workdir = tmp_path / "work"
    workdir.mkdir()
    _prepare_workdir(workdir, "".join(b.code for b in blocks if b.skip is None))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path / "segkit-data"))
    namespace: dict = {"__name__": f"docs_example_{Path(page).stem}"}
    for block in blocks:
        where = f"docs/{block.page}:{block.line}"
        if block.skip is not None:
            _report_skip(f"{where}: python block skipped: {block.skip}")
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - the documentation's own code
            except Exception as exc:  # noqa: BLE001 - any failure is reported with the block
                pytest.fail(f"{where}: the python block raised {type(exc).__name__}: {exc}\n{block.code}")


# --------------------------------------------------------------------------------- shell blocks
def command_lines(code: str) -> list[str]:
    """The block's logical lines (continuations joined, a leading ``$`` prompt removed)."""
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
    return [line[2:] if line.startswith("$ ") else line for line in joined]


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
    assert "tutorials/custom_coco.md" in PYTHON_PAGES and SHELL_BLOCKS
    assert segkit_arguments("srun segkit train configs/quickstart.yaml x=1  # note") == [
        "train", "configs/quickstart.yaml", "x=1"]
    assert segkit_arguments("torchrun --nnodes=2 -m segkit.cli eval CKPT") == ["eval", "CKPT"]
    assert command_lines("segkit train a \\\n    b=1\n$ segkit list\n") == ["segkit train a b=1", "segkit list"]
    assert _placeholders("IMAGES...") == ["IMAGES"] and _placeholders("PATH.ckpt") == ["PATH"]
    assert _placeholders("VOCdevkit/VOC2007") == [] and _placeholders("model.backbone.pretrained=null") == []
    assert _parse(["train", "configs/quickstart.yaml"]) is None
    assert "--out" in _parse(["predict", "model.ckpt", "a.png"])                # a required option missing
    assert _parse(["convert", "coco2voc", "a.json", "images", "out"]) is not None   # --split missing
