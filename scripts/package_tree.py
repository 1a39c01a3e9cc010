"""Builds ``build/package-tree/flowlane``: the ``flowlane`` package laid out as it imports.

The repository keeps each layer in its own top-level folder and setup.py maps the folders onto
subpackages (``api/`` -> ``flowlane.api``). The editable install resolves that mapping with an
import hook, which static tools do not run: mypy turns every ``flowlane.*`` import it cannot find
into ``Any`` (``ignore_missing_imports``), and import-linter cannot see ``flowlane.api`` at all.
This tree of symbolic links gives both tools the installed layout without copying a file, so a
call from ``flowlane.operator`` into ``flowlane.trainer`` is type-checked and its imports counted.
The folder list is read from setup.py's ``CODE_FOLDERS``, the one place it is written.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "package-tree"


def code_folders(setup_py: Path) -> dict[str, str]:
    """setup.py's ``CODE_FOLDERS`` (folder -> import name) without running setup.py."""
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "CODE_FOLDERS" for target in node.targets
        ):
            folders = ast.literal_eval(node.value)
            if isinstance(folders, dict):
                return {str(k): str(v) for k, v in folders.items()}
    raise SystemExit(f"{setup_py}: no CODE_FOLDERS dict found; the package tree needs the folder mapping")


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(os.path.relpath(target, link_path.parent), target_is_directory=target.is_dir())


def build(root: Path = ROOT, tree: Path = TREE) -> Path:
    folders = code_folders(root / "setup.py")
    if tree.exists():
        shutil.rmtree(tree)
    for folder, package in folders.items():
        parts = package.split(".")
        if len(parts) == 1:
            # The root package's folder holds its own modules (and sub-folders): link each entry, so
            # the mapped subpackages can sit beside them.
            for entry in sorted((root / folder).iterdir()):
                if entry.name != "__pycache__":
                    link(entry, tree.joinpath(*parts, entry.name))
        else:
            link(root / folder, tree.joinpath(*parts))
    return tree


if __name__ == "__main__":
    print(build(), file=sys.stderr)
