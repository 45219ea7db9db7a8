"""MkDocs hooks of dynlab's documentation site (mkdocs.yml: `hooks`).

* `<!-- cli-reference -->` in a page is replaced by the help of every command, generated from
  typer's own help (`tools/cli_reference.py`), so the reference cannot drift from the CLI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MARKER = "<!-- cli-reference -->"
GENERATOR = Path(__file__).resolve().parent / "cli_reference.py"


def cli_markdown() -> str:
    """tools/cli_reference.py's markdown(), loaded by path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("dynlab_cli_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown()


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs API)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())
