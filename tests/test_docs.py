"""The documentation site: every component and command documents itself, and the site builds strictly
from the generated reference pages."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_gen_docs():
    spec = importlib.util.spec_from_file_location("segkit_gen_docs", ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _load_gen_docs()


def test_every_registered_component_has_a_docstring():
    from segkit.cli import list_components

    missing = [f"{kind}: {entry.name} ({entry.module})"
               for kind, entries in list_components().items() for entry in entries
               if not gen_docs.own_docstring(entry.obj).strip()]
    assert not missing, "components without a docstring:\n  " + "\n  ".join(missing)


def test_every_command_has_help_and_a_description():
    problems = []
    for name, summary, parser in gen_docs.iter_commands():
        if name != "segkit" and not summary.strip():
            problems.append(f"`{name}` has no help line")
        if not (parser.description or "").strip():
            problems.append(f"`{name}` has no description")
    assert not problems, "\n".join(problems)


def test_every_option_and_argument_has_help():
    missing = [f"`{name}` {action.option_strings or action.dest}"
               for name, _, parser in gen_docs.iter_commands()
               for action in gen_docs.documented_arguments(parser) if not (action.help or "").strip()]
    assert not missing, "arguments without help: " + ", ".join(map(str, missing))


def test_reference_pages_name_every_command_and_component(tmp_path: Path):
    from segkit.cli import list_components

    gen_docs.write_pages(str(tmp_path))
    cli = (tmp_path / "cli.md").read_text(encoding="utf-8")
    components = (tmp_path / "components.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in cli for name, _, _ in gen_docs.iter_commands())
    for entries in list_components().values():
        assert all(f"### {entry.name} " in components for entry in entries)
    assert "::: segkit.load_config" in (tmp_path / "api.md").read_text(encoding="utf-8")
    architectures = (tmp_path / "architectures.md").read_text(encoding="utf-8")
    for _, config in gen_docs.ARCHITECTURE_CONFIGS:
        assert f"`{config}`" in architectures
    assert "| **`neck`** | **`PAFPN`** |" in architectures and "`backbone.output_shape()`" in architectures


def test_images_of_the_pages_exist():
    """Every picture a page shows is a file under docs/ (relative paths, as the site is opened from disk)."""
    missing = []
    for page in (ROOT / "docs").rglob("*.md"):
        if "examples" in page.relative_to(ROOT / "docs").parts:
            continue
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "missing pictures:\n  " + "\n  ".join(missing)


@pytest.mark.slow  # 14 s; `make docs` runs the same strict build
def test_site_builds_strictly(tmp_path: Path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([sys.executable, "tools/gen_docs.py"], cwd=ROOT, env=env, check=True, capture_output=True)
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    for page in ("index.html", "model_zoo.html", "architectures.html", "reference/cli.html",
                 "reference/components.html", "reference/api.html", "reference/architectures.html",
                 *(f"tutorials/{p.stem}.html" for p in (ROOT / "docs" / "tutorials").glob("*.md"))):
        assert (tmp_path / "site" / page).is_file(), page
    # Browsable from the disk, search included: nothing is fetched from the network, and the search
    # index is inlined into a script (no request a file:// page would be refused).
    remote = re.compile(r"""<(?:script|link)\b[^>]*(?:src|href)=["'](?:https?:)?//""")
    for html in (tmp_path / "site").rglob("*.html"):
        found = remote.search(html.read_text(encoding="utf-8"))
        assert found is None, f"{html.relative_to(tmp_path)} loads {found.group(0)}..."
    assert (tmp_path / "site" / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index =")
    assert (tmp_path / "site" / "assets" / "javascripts" / "iframe-worker-shim.js").is_file()
