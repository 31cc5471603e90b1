"""The documentation site's sources (docs/): its examples run, its reference misses no public name.

Every ```python block of a page runs, in the page's order, in one namespace per page (a guide's
later blocks use what its earlier ones defined), from the repository's root. Blocks that are not
meant to run use other fences (``bash``, ``yaml``, ``text``). A block importing an optional extra
that is not installed is skipped with the blocks after it on that page. `functrain.compile_step`
compiles with torch.compile's ``"eager"`` backend here unless a block names one, so that a page
runs in seconds (inductor's own compilation takes tens of seconds on a small CPU; the compiled
step's results are tested in tests/core).

The site itself is built by ``make docs`` (``mkdocs build --strict``), which CI runs.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import unicodedata
from pathlib import Path

import pytest

import functrain
from functrain.core.state import TREE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", flags=re.S | re.M)
DIRECTIVE = re.compile(r"^::: *([\w.]+)[ \t]*$", flags=re.M)
# the optional extras a block may import: such a block runs where `make test` installed them
EXTRAS = ("wandb", "optuna", "torchmetrics", "hydra", "hypothesis", "torchdata", "tensorboard")


def python_blocks(page: str) -> list[str]:
    return PYTHON_BLOCK.findall((DOCS / page).read_text())


def missing_extra(code: str) -> str | None:
    for extra in EXTRAS:
        imported = re.search(rf"^\s*(import|from) {extra}\b", code, flags=re.M)
        if imported and importlib.util.find_spec(extra) is None:
            return extra
    return None


def test_the_guides_have_examples():
    pages = [p for p in PAGES if p.startswith("guides/") and p != "guides/index.md"]
    assert len(pages) >= 10
    assert [p for p in pages if not python_blocks(p)] == []


def test_python_blocks_are_not_indented():
    """An indented block (inside an admonition or a list) would not run here: keep them flush."""
    indented = [p for p in PAGES if re.search(r"^[ \t]+```python", (DOCS / p).read_text(), re.M)]
    assert indented == []


def quick_compile_step(*, backend: str = "eager", **options: object) -> object:
    return COMPILE_STEP(backend=backend, **options)


COMPILE_STEP = functrain.compile_step


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_page_examples_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(functrain, "compile_step", quick_compile_step)
    namespace: dict[str, object] = {}
    for index, code in enumerate(python_blocks(page)):
        extra = missing_extra(code)
        if extra is not None:
            pytest.skip(f"{page}[{index}] and the blocks after it need {extra}")
        exec(compile(code, f"docs/{page}[{index}]", "exec"), namespace)


def documented_objects() -> list[object]:
    """What the reference pages' ``::: path`` directives name, imported."""
    objects = []
    for page in (DOCS / "reference").glob("*.md"):
        for path in DIRECTIVE.findall(page.read_text()):
            module, _, name = path.rpartition(".")
            try:
                objects.append(importlib.import_module(path))
            except ImportError:
                objects.append(getattr(importlib.import_module(module), name))
    return objects


def test_the_reference_documents_every_public_name():
    documented = documented_objects()
    members = {  # a module's directive documents its __all__
        id(getattr(obj, name))
        for obj in documented
        if isinstance(obj, type(functrain))
        for name in getattr(obj, "__all__", ())
    }
    covered = {id(obj) for obj in documented} | members
    missing = [name for name in functrain.__all__ if id(getattr(functrain, name)) not in covered]
    assert missing == [], (
        f"add a '::: functrain.<name>' directive to a docs/reference page: {missing}"
    )


def test_the_checkpoint_format_names_every_saved_field_of_a_train_state():
    text = (DOCS / "reference" / "checkpoint-format.md").read_text()
    start = text.index("A `TrainState` is stored as a `dict` node of its saved fields:")
    paragraph = text[start : text.index("\n\n", start)]
    missing = [f for f in TREE_FIELDS if f"`{f}`" not in paragraph]
    assert missing == [], f"say what these saved fields hold in checkpoint-format.md: {missing}"


def test_readme_links_into_the_docs_resolve():
    links = re.findall(r"\]\(((?!https?:|#)[^)#]+)", (ROOT / "README.md").read_text())
    assert [link for link in links if not (ROOT / link).exists()] == []


def heading_anchors(text: str) -> set[str]:
    """The anchors of a page's headings, as the site's ``toc`` extension makes them."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", text, flags=re.M):
        named = re.search(r"\{#([\w-]+)\}$", heading)
        if named:
            anchors.add(named.group(1))
            continue
        words = re.sub(r"\[([^\]]*)\](?:\[[^\]]*\]|\([^)]*\))", r"\1", heading.replace("`", ""))
        words = unicodedata.normalize("NFKD", words).encode("ascii", "ignore").decode()
        words = re.sub(r"[^\w\s-]", "", words).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", words))
    return anchors


def test_links_into_a_page_name_a_heading_it_has():
    """What ``mkdocs build --strict`` checks of the anchors, without the docs extra."""
    sources = {"explanation/benchmarks.md": ROOT / "benchmarks" / "README.md"}  # (generated)
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", (DOCS / page).read_text(), flags=re.S | re.M)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            target = target or posixpath.basename(page)
            if anchor.startswith("functrain."):  # the reference's, made from the docstrings
                continue
            linked = posixpath.normpath(posixpath.join(posixpath.dirname(page), target))
            path = sources.get(linked, DOCS / linked)
            if linked.startswith("examples/"):  # pages made from the notebooks and scripts
                continue
            if not path.exists() or anchor not in heading_anchors(path.read_text()):
                broken.append(f"{page}: {target}#{anchor}")
    assert broken == []


def load_hooks():
    pytest.importorskip("mkdocs", reason="the docs' build hooks need the docs extra")
    pytest.importorskip("griffe", reason="the docs' build hooks need the docs extra")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_a_notebook_page_shows_its_stored_outputs_without_running_it():
    hooks = load_hooks()
    notebook = {
        "cells": [
            {"cell_type": "markdown", "source": ["# Title\n", "Some prose."]},
            {
                "cell_type": "code",
                "source": "print('a')\nprint('b')\n1 / 0",
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": ["a\n"]},
                    {"output_type": "stream", "name": "stdout", "text": "b\n"},
                    {"output_type": "display_data", "data": {"image/png": "iVBORw0K\n"}},
                    {
                        "output_type": "error",
                        "ename": "ZeroDivisionError",
                        "evalue": "division by zero",
                        "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"],
                    },
                ],
            },
            {"cell_type": "code", "source": "x = '```'", "outputs": []},
        ]
    }
    page = hooks.notebook_markdown(notebook, "notebooks/x.ipynb")
    assert page.startswith("# Title\n\n!!! note")
    assert "with the outputs it stores" in page
    assert "```text\na\nb\n```" in page  # consecutive prints in one block
    assert '<img alt="output" src="data:image/png;base64,iVBORw0K">' in page
    assert "```text\nZeroDivisionError: division by zero\n```" in page  # no ANSI codes
    assert "````python\nx = '```'\n````" in page  # a longer fence than any inside


def test_a_notebook_kept_without_outputs_says_so():
    hooks = load_hooks()
    page = hooks.notebook_markdown(
        {"cells": [{"cell_type": "code", "source": "1", "outputs": []}]}, "notebooks/y.ipynb"
    )
    assert page.startswith("!!! note") and "kept without outputs" in page


def test_generated_pages_cover_every_notebook_and_example_script():
    hooks = load_hooks()
    pages = hooks.generated_pages()
    expected = {f"examples/{p.stem}.md" for p in (ROOT / "notebooks").glob("*.ipynb")}
    expected |= {f"examples/{p.stem}.md" for p in (ROOT / "examples").glob("*.py")}
    assert expected | {"explanation/benchmarks.md"} == set(pages)
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [uri for uri in pages if uri not in nav] == []
