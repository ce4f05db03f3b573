"""The configs shipped in the package, and how a config argument finds its file.

The YAML files of the repository's ``configs/`` folder are installed with segkit as the package
``segkit_configs``, so they work from any folder after a plain ``pip install``:

* ``segkit train quickstart`` (or ``quickstart.yaml``, ``configs/quickstart.yaml``,
  ``segkit://quickstart``) uses the packaged file when no such file exists where the command runs;
  a file of that name next to the user always wins.
* ``_base_: [segkit://_base_/models/mask_rcnn_r50_fpn.yaml]`` names a packaged base from any config.
* ``segkit configs`` lists them, ``segkit configs copy NAME`` writes one next to the user for editing,
  its relative ``_base_`` entries rewritten to ``segkit://`` names so the copy works where it lies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

from segkit.errors import ConfigError, UserError, did_you_mean

__all__ = ["PACKAGED_SCHEME", "PackagedConfig", "copy_config", "find_config", "packaged_config", "packaged_configs",
           "packaged_dir"]

#: The prefix naming a packaged config in a config argument or a ``_base_`` entry.
PACKAGED_SCHEME = "segkit://"

_SUFFIX = ".yaml"


@dataclass(frozen=True)
class PackagedConfig:
    """One packaged config: ``name`` (its path under the package without ``.yaml``, e.g.
    ``quickstart`` or ``_base_/models/faster_rcnn_r50_fpn``), ``path`` (the file) and ``description``
    (the first sentence of its leading comment)."""

    name: str
    path: str
    description: str


def packaged_dir() -> str:
    """The folder holding the packaged configs (the repository's ``configs/`` in an editable install)."""
    return str(resources.files("segkit_configs"))


def packaged_configs(*, bases: bool = False) -> list[PackagedConfig]:
    """Every packaged config, sorted by name; ``bases``: also the ``_base_`` files."""
    root = packaged_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        rel = os.path.relpath(folder, root)
        if rel != "." and not bases:
            continue
        for file in sorted(files):
            if file.endswith(_SUFFIX):
                name = file[:-len(_SUFFIX)] if rel == "." else f"{rel.replace(os.sep, '/')}/{file[:-len(_SUFFIX)]}"
                path = os.path.join(folder, file)
                found.append(PackagedConfig(name, path, _description(path)))
    return sorted(found, key=lambda c: (c.name.startswith("_"), c.name))


def packaged_config(name: str, *, key: str | None = None, file: str | None = None) -> str:
    """The file of the packaged config ``name`` (``quickstart``, ``quickstart.yaml``,
    ``segkit://quickstart``, ``_base_/models/fpn.yaml``...).

    Raises:
        ConfigError: no such config, naming the closest packaged names (and ``key``/``file`` when a
            config's ``_base_`` named it).
    """
    rel = _packaged_name(name)
    root = os.path.realpath(packaged_dir())
    path = os.path.realpath(os.path.join(root, (rel or "") + _SUFFIX))
    if rel is None or os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        raise ConfigError(f"no packaged config '{name}'.{_suggest(rel)} `segkit configs` lists them "
                          f"(`segkit configs --all` with the _base_ files).", key=key, file=file)
    return path


def find_config(path: str) -> str:
    """The file a config argument means: ``path`` itself when it exists, else the packaged config of
    that name (``segkit://NAME``, ``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml``).

    Raises:
        ConfigError: neither exists; the message names the file looked for and close packaged names.
    """
    if path.startswith(PACKAGED_SCHEME):
        return packaged_config(path)
    if os.path.exists(path):
        return path
    rel = _packaged_name(path)
    if rel is not None:
        candidate = os.path.join(packaged_dir(), rel + _SUFFIX)
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"config file '{path}' does not exist (looked in {os.getcwd()}).{_suggest(rel)} "
                      f"`segkit configs` lists the packaged configs, usable by name from any folder.")


def copy_config(name: str, dest: str | None = None, *, force: bool = False) -> str:
    """Write the packaged config ``name`` to ``dest`` (default ``./<name>.yaml``) with its relative
    ``_base_`` entries as ``segkit://`` names; returns the path written.

    Raises:
        UserError: ``dest`` exists (without ``force``) or cannot be written.
    """
    from segkit.fileio import atomic_write_text
    from segkit.textio import read_text

    source = packaged_config(name)
    rel = _packaged_name(name)
    if dest is None:
        dest = os.path.basename(rel) + _SUFFIX
    elif os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(rel) + _SUFFIX)
    if os.path.exists(dest) and not force:
        raise UserError(f"'{dest}' exists; choose another destination or pass --force to overwrite it.")
    text = read_text(source, error=ConfigError, what="config file")
    base_dir = os.path.dirname(rel)
    atomic_write_text(dest, _rewrite_bases(text, base_dir), what="the copied config")
    return dest


_BASE_LINE = re.compile(r"^_base_\s*:(.*)$")


def _rewrite_bases(text: str, base_dir: str) -> str:
    """``text`` with each relative ``_base_`` entry (a block list, a flow list or one string) replaced by
    its ``segkit://`` name; packaged configs keep their ``_base_`` at the top level, one entry a line."""
    def packaged(entry: str) -> str:
        entry = entry.strip().strip("'\"")
        if entry.startswith(PACKAGED_SCHEME) or os.path.isabs(entry):
            return entry
        return PACKAGED_SCHEME + os.path.normpath(os.path.join(base_dir, entry)).replace(os.sep, "/")

    lines = text.splitlines(keepends=True)
    out, in_block = [], False
    for line in lines:
        match = _BASE_LINE.match(line)
        if match:
            value = match.group(1).split("#")[0].strip()
            if value.startswith("["):
                entries = [e for e in value.strip("[]").split(",") if e.strip()]
                line = f"_base_: [{', '.join(packaged(e) for e in entries)}]\n"
            elif value:
                line = f"_base_: {packaged(value)}\n"
            in_block = not value
        elif in_block:
            item = re.match(r"^(\s*-\s*)([^#\s][^#]*?)(\s*(#.*)?)$", line.rstrip("\n"))
            if item:
                line = f"{item.group(1)}{packaged(item.group(2))}{item.group(3)}\n"
            elif line.strip() and not line.lstrip().startswith("#"):
                in_block = False
        out.append(line)
    return "".join(out)


def _packaged_name(name: str) -> str | None:
    """``name`` as a path under the package without ``.yaml``, or None when it cannot name one."""
    rel = name[len(PACKAGED_SCHEME):] if name.startswith(PACKAGED_SCHEME) else name
    rel = rel.replace("\\", "/")
    if rel.startswith("configs/"):
        rel = rel[len("configs/"):]
    if rel.endswith(_SUFFIX):
        rel = rel[:-len(_SUFFIX)]
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        return None
    return rel


def _suggest(rel: str | None) -> str:
    """`` Did you mean 'x'?`` for the packaged configs closest to ``rel``, or ``""``."""
    if not rel:
        return ""
    return did_you_mean(rel, [c.name for c in packaged_configs(bases="/" in rel)])


def _description(path: str) -> str:
    """The first sentence of a config's leading ``#`` comment."""
    lines = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(lines).strip()
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]
