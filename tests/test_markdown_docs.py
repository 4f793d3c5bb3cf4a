"""Every ```python block of README.md and docs/*.md runs as a test, so the documentation cannot drift from the code.

The info-string options are those of pytest-markdown-docs (``pytest --markdown-docs README.md docs`` reads the same
files the same way): ```` ```python notest ```` is shown but not run, ```` ```python continuation ```` runs in the
namespace left by the block before it. A block and its continuations form one test. bash, console and unlabelled
blocks are not run: the README's two setup commands are exactly what CI runs (``.ci/run``). Each test runs in its
own temporary working directory, so a block that saves files leaves the checkout clean. Blocks that would download
weights use random-weight stand-ins instead, and the page says so next to the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {"py", "python", "python3"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)$")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/ (new pages are picked up without touching this file)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def fences(text: str) -> list[tuple[int, list[str], str]]:
    """(line number of the first code line, info words, code) of each fenced block, indentation removed."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m["marker"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        indent, marker, start = len(m["indent"]), m["marker"], i + 1
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$", lines[i]):
            i += 1
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[start:i]]
        blocks.append((start + 1, m["info"].split(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def chains(text: str, name: str = "<page>") -> list[tuple[int, list[tuple[int, str]]]]:
    """The python blocks of a page, a block and its `continuation` blocks grouped into one chain."""
    out: list = []
    for line, info, code in fences(text):
        if not info or info[0] not in PYTHON or "notest" in info[1:]:
            continue
        if "continuation" in info[1:]:
            if not out:
                raise ValueError(f"{name}:{line}: a `python continuation` block needs a python block before it")
            out[-1][1].append((line, code))
        else:
            out.append((line, [(line, code)]))
    return out


CASES = [(path, line, blocks) for path in markdown_files()
         for line, blocks in chains(path.read_text(encoding="utf-8"), str(path))]


@pytest.mark.parametrize("path, line, blocks", CASES,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in CASES])
def test_markdown_code_block_runs(path, line, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__markdown_docs__"}
    for start, code in blocks:
        # Padding keeps the page's line numbers in tracebacks: "README.md", line 42.
        exec(compile("\n" * (start - 1) + code, str(path), "exec"), namespace)


def test_a_continuation_without_a_block_before_it_is_an_error():
    with pytest.raises(ValueError, match="needs a python block before it"):
        chains("```python continuation\nx = 1\n```\n", "page.md")


def test_collector_finds_the_readme_blocks_and_honours_the_options():
    readme = [c for c in CASES if c[0].name == "README.md"]
    assert len(readme) >= 2 and any("save_pretrained" in code for _, _, blocks in readme for _, code in blocks)
    page = "\n".join([
        "text", "```python", "a = 1", "```", "```python continuation", "b = a + 1", "```",
        "```python notest", "import does_not_exist", "```", "```bash", "rm -rf /", "```",
        "1. a list item:", "   ```python", "   c = 3", "   ```", "````python", "d = '```'", "````",
    ])
    found = chains(page)
    assert [(line, [code for _, code in blocks]) for line, blocks in found] == [
        (3, ["a = 1\n", "b = a + 1\n"]), (16, ["c = 3\n"]), (19, ["d = '```'\n"]),
    ]
