"""Render the CLI reference (docs/cli.md) from the commands' own ``--help``.

Regenerate with ``python -m altsearch.clidoc > docs/cli.md``; a test fails when the page is stale.
"""

from __future__ import annotations

import os

HEADER = """# altsearch command reference

Generated from `altsearch --help` by `python -m altsearch.clidoc > docs/cli.md`; do not edit by hand.

Every command exits 0 on success and non-zero with a one-line `error: ...` on stderr otherwise
(`index` exits 130 when interrupted, after committing the finished work). `--json` prints
machine-readable output on stdout. The index is chosen with `--index NAME_OR_FOLDER` or the
`ALTSEARCH_INDEX` variable; `ALTSEARCH_HOME` moves the home of named indexes.
"""

COMMANDS = [[], ["index"], ["search"], ["similar"], ["info"], ["errors"], ["remove"], ["optimize"],
            ["check"], ["model"], ["model", "info"], ["model", "convert"]]


def render() -> str:
    from typer.testing import CliRunner

    from .cli import app

    runner = CliRunner()
    env = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    parts = [HEADER]
    for words in COMMANDS:
        result = runner.invoke(app, [*words, "--help"], env=env, prog_name="altsearch")
        if result.exit_code != 0:
            raise RuntimeError(f"altsearch {' '.join(words)} --help failed: {result.output}")
        title = " ".join(["altsearch", *words])
        text = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
        parts.append(f"## `{title}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "100")
    print(render(), end="")
