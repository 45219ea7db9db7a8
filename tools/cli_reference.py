"""The command-line reference, generated from typer's own help (never copied by hand).

`markdown()` renders `dynlab --help` and the help of every command and sub-command as
Markdown sections; the MkDocs hook `tools/mkdocs_hooks.py` puts it where a page says
`<!-- cli-reference -->`, and `python tools/cli_reference.py` prints it.
"""

from __future__ import annotations

import typer
from typer.testing import CliRunner

WIDTH = "100"


def commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `group` (typer's click command), depth first, in the order the
    CLI lists them."""
    out = [path]
    if hasattr(group, "list_commands"):
        for name in group.list_commands(None):
            out += commands(group.commands[name], (*path, name))
    return out


def help_text(app: typer.Typer, path: tuple[str, ...]) -> str:
    """`dynlab PATH --help` as typer prints it to a 100-column terminal without colour."""
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="dynlab",
                                env={"COLUMNS": WIDTH, "TERMINAL_WIDTH": WIDTH,
                                     "NO_COLOR": "1", "TERM": "dumb"})
    if result.exit_code != 0:
        raise RuntimeError(f"dynlab {' '.join(path)} --help exited {result.exit_code}: "
                           f"{result.output}")
    return "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())


def markdown() -> str:
    """One section per command: its name as a heading, typer's help in a text block."""
    from dynlab_cli.main import app

    parts = []
    for path in commands(typer.main.get_command(app)):
        title = " ".join(("dynlab", *path))
        level = "##" if len(path) <= 1 else "###"
        parts.append(f"{level} `{title}`\n\n```text\n{help_text(app, path)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown())
