"""Every example in README.md and docs/ runs, unmodified, in a sandbox (tests/sandbox.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox import as_if_cores, make_sandbox

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def examples(path: Path) -> list[tuple[str, str]]:
    """(kind, code) for each runnable block: ``console`` lines starting with ``$ altsearch`` and
    ``python`` blocks. Install and test commands (```bash) are run by CI itself."""
    out = []
    for lang, body in FENCE.findall(path.read_text(encoding="utf-8")):
        if lang == "console":
            out += [("shell", line[2:]) for line in body.splitlines() if line.startswith("$ altsearch")]
        elif lang == "python":
            out.append(("python", body))
    return out


def test_readme_has_the_main_job():
    cmds = [c for k, c in examples(ROOT / "README.md") if k == "shell"]
    assert any(c.startswith("altsearch index") for c in cmds)
    assert any("海边的日落" in c for c in cmds) and any("sunset" in c for c in cmds)
    assert "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e \".[dev]\"" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("doc", [d for d in DOCS if examples(d)], ids=lambda p: p.name)
def test_examples_run(doc, tmp_path):
    env = make_sandbox(tmp_path)
    # Python examples run as the script a user saves them to, on what looks like a 4-core machine: an
    # indexing run then starts a decode worker, which runs the script's top level again (spawn)
    script_env = as_if_cores(env, tmp_path, 4)
    for n, (kind, code) in enumerate(examples(doc)):
        if kind == "shell":
            proc = subprocess.run(["bash", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300)
        else:
            script = tmp_path / f"example_{n}.py"
            script.write_text(code, encoding="utf-8")
            proc = subprocess.run([sys.executable, str(script)], env=script_env, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300)
        assert proc.returncode == 0, f"{doc.name}: {code!r} failed:\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_links_to_headings_lead_somewhere():
    broken = []
    for doc in [*DOCS, ROOT / "benchmarks" / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            linked = (doc.parent / target) if target else doc
            if not linked.is_file() or anchor not in _anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


def test_every_extra_the_docs_name_exists():
    """`pip install "altsearch[gpu]"`, `.[nvimgcodec-cu13]`, ...: a misspelt extra installs nothing, silently."""
    tomllib = pytest.importorskip("tomllib")
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set()
    for doc in DOCS:
        for group in re.findall(r"(?:altsearch|`\.|\"\.)\[([\w,-]+)\]", doc.read_text(encoding="utf-8")):
            named.update(group.split(","))
    assert {"gpu", "nvimgcodec-cu13", "dev"} <= named
    assert named <= defined, named - defined


def test_python_api_names_every_field_of_its_results():
    """`IndexReport` and `Hit` as python-api.md describes them: every field, and what to_dict() adds."""
    import dataclasses

    from altsearch import Hit, IndexReport

    text = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    for cls in (IndexReport, Hit):
        section = text[text.index(f"`{cls.__name__}` has"):]
        section = section[: section.index("\n\n")]
        names = {f.name for f in dataclasses.fields(cls)} | {n for n in vars(cls) if isinstance(vars(cls)[n], property)}
        missing = sorted(n for n in names if not n.startswith("_") and f"`{n}`" not in section)
        assert missing == [], f"{cls.__name__}: {missing}"
