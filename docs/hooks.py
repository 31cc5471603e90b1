"""MkDocs hooks: pages generated from the repository's own files when the site is built.

- ``notebooks/*.ipynb`` -> ``examples/<name>.md``: the notebook's cells as Markdown and code, with
  the outputs the notebook stores (text, images, errors). Nothing is executed.
- ``examples/*.py`` -> ``examples/<name>.md``: the script, whole, with how to run it.
- ``benchmarks/README.md`` -> ``explanation/benchmarks.md``: the measured figures live there once.

The source files are watched by ``mkdocs serve``.

The notebooks are kept without outputs. To publish a site that shows them, execute copies
elsewhere and point the build at them (the build itself never runs a notebook), e.g.
``jupyter nbconvert --to notebook --execute --output-dir /tmp/nb notebooks/*.ipynb``, then
``FUNCTRAIN_DOCS_NOTEBOOKS=/tmp/nb make docs``.

`ExampleSections`, a griffe extension that mkdocs.yml loads from this file, reads a docstring's
``Example:`` section as Google style's ``Examples:`` (its doctests rendered as code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = Path(os.environ.get("FUNCTRAIN_DOCS_NOTEBOOKS", ROOT / "notebooks"))
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
IMAGES = ("image/png", "image/jpeg", "image/svg+xml")
EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleSections(griffe.Extension):
    """Docstrings' ``Example:`` sections parsed as ``Examples:``, so their doctests are code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)


def fenced(text: str, language: str) -> str:
    """`text` in a fenced block longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def joined(source: str | list[str]) -> str:
    """A notebook field stored as one string or as a list of lines."""
    return source if isinstance(source, str) else "".join(source)


def output_markdown(output: dict[str, Any]) -> str | None:
    """One stored output of a code cell as Markdown; None for what a static page cannot show."""
    kind = output.get("output_type")
    if kind == "stream":
        return fenced(ANSI.sub("", joined(output.get("text", ""))), "text")
    if kind == "error":
        traceback = "\n".join(output.get("traceback", [])) or (
            f"{output.get('ename')}: {output.get('evalue')}"
        )
        return fenced(ANSI.sub("", traceback), "text")
    data = output.get("data", {})
    for mime in IMAGES:
        if mime in data:
            payload = joined(data[mime]).replace("\n", "")
            if mime == "image/svg+xml":
                import base64

                payload = base64.b64encode(payload.encode()).decode()
            return f'<img alt="output" src="data:{mime};base64,{payload}">'
    if "text/plain" in data:
        return fenced(ANSI.sub("", joined(data["text/plain"])), "text")
    return None


def cell_outputs(outputs: list[dict[str, Any]]) -> list[str]:
    """A cell's outputs; consecutive stream outputs (print after print) join into one block."""
    merged: list[dict[str, Any]] = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and output.get("output_type") == "stream" == previous.get("output_type")
            and output.get("name") == previous.get("name")
        ):
            previous["text"] = joined(previous["text"]) + joined(output.get("text", ""))
        else:
            merged.append(dict(output))
    return [md for md in map(output_markdown, merged) if md is not None]


def notebook_markdown(notebook: dict[str, Any], path: str) -> str:
    """A notebook (nbformat 4 JSON) as a Markdown page, its stored outputs after each cell."""
    blocks: list[str] = []
    stored = False
    for cell in notebook.get("cells", []):
        source = joined(cell.get("source", ""))
        if cell.get("cell_type") == "markdown":
            blocks.append(source)
        elif cell.get("cell_type") == "code" and source.strip():
            blocks.append(fenced(source, "python"))
            outputs = cell_outputs(cell.get("outputs", []))
            stored = stored or bool(outputs)
            blocks.extend(outputs)
    note = (
        f"This page is `{path}` with the outputs it stores; nothing was run to build it. "
        f"Run it yourself with `jupyter lab {path}`."
        if stored
        else f"This page is `{path}`. The notebook is kept without outputs: run it with "
        f"`jupyter lab {path}` to see them (`tests/test_notebooks.py` runs it top to bottom)."
    )
    return with_note("\n\n".join(blocks), note)


def with_note(markdown: str, note: str) -> str:
    """`markdown` with an admonition holding `note` after its title (or first, without one)."""
    admonition = '!!! note "Source"\n    ' + note
    title = re.match(r"\A(# [^\n]*\n)", markdown)
    if title is None:
        return f"{admonition}\n\n{markdown}\n"
    return f"{title.group(1)}\n{admonition}\n\n{markdown[title.end() :].lstrip()}\n"


def script_markdown(path: Path) -> str:
    """An example script as a page: its docstring's first line, how to run it, the code."""
    code = path.read_text()
    docstring = re.match(r'\A\s*"""(.*?)\n', code)
    summary = docstring.group(1).strip() if docstring else ""
    where = f"examples/{path.name}"
    return (
        f"# {path.name}\n\n{summary}\n\n"
        f"Run it from the repository's root (a few seconds on a CPU, no download):\n\n"
        f"```bash\npython {where}\n```\n\n"
        f"`tests/driver/test_ports.py` runs it in the test suite. The whole script, its "
        f"docstring's table mapping each setting to functrain's:\n\n{fenced(code, 'python')}\n"
    )


def generated_pages() -> dict[str, str]:
    """Page path (inside docs/) -> Markdown, for every page built from another file."""
    pages = {}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        pages[f"examples/{path.stem}.md"] = notebook_markdown(notebook, f"notebooks/{path.name}")
    for path in sorted(EXAMPLES.glob("*.py")):
        pages[f"examples/{path.stem}.md"] = script_markdown(path)
    pages["explanation/benchmarks.md"] = BENCHMARKS.read_text()
    return pages


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for uri, content in generated_pages().items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    for source in (NOTEBOOKS, EXAMPLES, BENCHMARKS, ROOT / "functrain"):
        if source.exists():
            config.watch.append(str(source))
    return config
