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
`ALTSEARCH_INDEX` variable; `ALTSEARCH_HOME` moves the home of named indexes, and altsearch's cache
(the tokenizer's piece table, otherwise in `$XDG_CACHE_HOME/altsearch` or `~/.cache/altsearch`) to
`$ALTSEARCH_HOME/cache`.

`index` ends with what the run did: files added, updated, moved, removed (gone from the folder),
unchanged and failed. A failed file that was indexed before (changed since into something that
cannot be read) is named as dropped from the index (`dropped` in `--json`); `altsearch errors` lists
every failure with its reason.

`search` and `similar` print a table of `rank`, `id` (`#12`: the form a query names an indexed
image by, as in `altsearch similar "#12"`), `score`, `date`, `size` and `path`. A path that names
nothing is warned of on stderr (`warning: ...`, exit 0): one given to `remove` that is neither on
disk nor in the index (as an image or a recorded failure), and an `--under` folder that does not
exist when nothing was found. An empty path (`""`, as an unset shell variable gives) is an error.
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
