"""What a config file may hold: UTF-8 text, plain YAML values, bounded nesting and aliases.

A YAML file is small and its cost is not: aliases share a node (``b: [*a, *a, *a]``), and OmegaConf
copies every shared node where it is used, so a few hundred bytes of anchors nine levels deep
ask for a billion values ("billion laughs"); PyYAML composes nested lists by recursion, so a file
of 50,000 ``[`` runs out of Python's stack. `bounded_yaml` makes every YAML file that
`functrain.load_config` reads (the config, and the config groups and defaults Hydra reads beside
it) refuse both before anything is built from them, with a `ConfigError` naming the file and line:

- nesting deeper than `MAX_DEPTH` mappings and lists (a run's config nests about ten);
- aliases that add more than `MAX_ALIAS_VALUES` values to those written (reusing a block a few
  times adds hundreds), or that refer to a node holding themselves (a cycle);
- a number that YAML 1.1 reads otherwise than its digits say: a leading 0 (``seed: 010`` is 8,
  octal) or colons (``max_time: 1:30`` is 90, base 60).

OmegaConf's interpolations expand as aliases do (``b: '${a}${a}${a}'``, each level ten times the
last): `interpolation_problem` refuses a config whose interpolations, resolved, would hold more than
`MAX_RESOLVED` characters and values, before they are resolved.

`yaml_problem` words PyYAML's own errors the same way: a syntax error, and a tag that is not plain
YAML (``!!python/object/apply:os.system``; OmegaConf's loader is PyYAML's safe loader, which
constructs none of them but the tags of paths OmegaConf adds, dropped here, and says so here).
`text_problem` checks that a file is UTF-8.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from functrain.errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_ALIAS_VALUES",
    "MAX_RESOLVED",
    "MISSING",
    "bounded_yaml",
    "interpolation_problem",
    "selected",
    "text_problem",
    "yaml_problem",
]

MAX_DEPTH = 32
MAX_ALIAS_VALUES = 10_000
MAX_RESOLVED = 1_000_000
# a node an interpolation names: ``${a.b}``, ``${a[0]}``, ``${..c}`` (inside a resolver's arguments
# too: ``${ft.mul:${a},2}``)
_REFERENCE = re.compile(
    r"\$\{\s*(?:oc\.select\s*:\s*)?(\.*[A-Za-z_][\w\-]*(?:(?:\.[\w\-]+)|(?:\[\d+\]))*)\s*[,}]"
)


MISSING = object()
"""What `selected` finds where nothing is."""


def selected(node: Any, path: Sequence[Any]) -> Any:
    """The value at `path` under `node` (its keys, and list positions as ints or digits), or
    `MISSING`: what an interpolation names, and a dotted key of `build_run`'s."""
    for part in path:
        if isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return MISSING
    return node


def interpolation_problem(raw: Any) -> str | None:
    """Why the config `raw` (composed, its interpolations unresolved: plain dicts, lists and
    strings) must not be resolved, or None: its values, each interpolation counted as the node it
    names, would hold more than `MAX_RESOLVED` characters and values.

    Example:
        >>> bomb = {"a": "x" * 10, **{f"b{i}": f"${{b{i - 1}}}" * 10 for i in range(1, 9)}}
        >>> bomb["b1"] = "${a}" * 10
        >>> print(interpolation_problem(bomb))  # doctest: +ELLIPSIS
        config key b5: its interpolations would resolve to about 1,455,550 characters...
        >>> interpolation_problem({"steps": 10, "fit": {"max_steps": "${steps}"}}) is None
        True
    """
    sizes: dict[tuple[Any, ...], int] = {}
    keys = raw if isinstance(raw, dict) else {}

    def target(at: tuple[Any, ...], text: str) -> tuple[Any, ...]:
        dots = len(text) - len(text.lstrip("."))
        parts: list[Any] = []
        for piece in re.split(r"\.|\[", text.lstrip(".")):
            piece = piece.rstrip("]")
            if piece:
                parts.append(int(piece) if piece.isdigit() else piece)
        base = () if dots == 0 else at[: max(len(at) - dots, 0)]
        return (*base, *parts)

    def size(path: tuple[Any, ...]) -> int:
        if path in sizes:
            return sizes[path]
        sizes[path] = 1  # (a cycle: OmegaConf refuses it when it resolves)
        value = selected(raw, path)
        if isinstance(value, dict):
            total = 1 + sum(size((*path, k)) for k in value)
        elif isinstance(value, list):
            total = 1 + sum(size((*path, i)) for i in range(len(value)))
        elif isinstance(value, str) and "${" in value:
            found = _REFERENCE.findall(value)
            total = len(value) + sum(size(target(path, ref)) for ref in found)
            # a key itself interpolated (``${${name}}``): counted as the largest node it may name
            dynamic = value.count("${${")
            if dynamic:
                total += dynamic * max((size((k,)) for k in keys if (k,) != path), default=0)
        else:
            total = len(value) if isinstance(value, str) else 1
        sizes[path] = min(total, 10 * MAX_RESOLVED)
        return sizes[path]

    for key in keys:
        got = size((key,))
        if got > MAX_RESOLVED:
            worst = max(
                (p for p in sizes if p and p[0] == key), key=lambda p: sizes[p], default=(key,)
            )
            shown = ".".join(str(p) for p in worst)
            return (
                f"config key {shown}: its interpolations would resolve to about {got:,} "
                f"characters and values (more than {MAX_RESOLVED:,}: interpolations that name "
                "interpolations, each level multiplying the last, as aliases do); write the "
                "values out, or interpolate fewer times"
            )
    return None


_SWAP = threading.Lock()


def _where(mark: Any) -> str:
    """``config file '<name>', line N``, from a PyYAML mark."""
    return f"config file {str(mark.name)!r}, line {mark.line + 1}"


def _bounded(base: type) -> type:
    """A subclass of the YAML loader `base` that refuses deep nesting and expanding aliases."""

    class BoundedLoader(base):
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self._depth >= MAX_DEPTH:
                raise ConfigError(
                    f"{_where(self.peek_event().start_mark)}: mappings and lists nest deeper than "
                    f"{MAX_DEPTH} levels here; a run's config needs a few: flatten it (a deeper "
                    "file would exhaust Python's stack)"
                )
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def compose_document(self) -> Any:
            node = super().compose_document()
            _check_aliases(node)
            return node

        def compose_scalar_node(self, anchor: Any) -> Any:
            node = super().compose_scalar_node(anchor)
            base = _yaml11_base(node)
            if base is not None:
                number = (
                    self.construct_yaml_int(node)
                    if node.tag.endswith(":int")
                    else self.construct_yaml_float(node)
                )
                raise ConfigError(
                    f"{_where(node.start_mark)}: {node.value} reads as {number!r} here (YAML "
                    f"1.1, which config files are read by, takes {base}), where the command line "
                    f"reads it as the text {node.value!r}; write the number you mean ({number!r}, "
                    f"or without the {'colons' if ':' in node.value else 'leading 0'}), or quote "
                    "it for the text"
                )
            return node

    # OmegaConf's loader constructs the Python tags of paths (!!python/object/apply:pathlib.Path):
    # a config holds plain YAML values only, so those tags are refused as every other one is
    BoundedLoader.yaml_constructors = {
        tag: construct
        for tag, construct in BoundedLoader.yaml_constructors.items()
        if not (tag or "").startswith(_PYTHON_TAGS)
    }
    return BoundedLoader


_PYTHON_TAGS = "tag:yaml.org,2002:python/"


def _yaml11_base(node: Any) -> str | None:
    """How YAML 1.1 reads the plain number `node` unlike its digits, or None.

    A leading 0 is octal (``010`` is 8) and colons are base 60 (``1:30`` is 90); YAML 1.2 and
    Hydra's override grammar read both otherwise.
    """
    if not node.tag.endswith((":int", ":float")):
        return None
    digits = node.value.lstrip("+-").replace("_", "")
    if ":" in digits:
        return "digits between colons as base 60"
    if node.tag.endswith(":int") and len(digits) > 1 and digits[0] == "0" and digits.isdigit():
        return "a number with a leading 0 as octal"
    return None


def _check_aliases(root: Any) -> None:
    """Refuse a composed document whose aliases expand it by more than `MAX_ALIAS_VALUES`."""
    sizes: dict[int, int] = {}  # each node's size with its aliases expanded, by identity
    open_: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ConfigError(
                f"{_where(node.start_mark)}: an alias here refers to a node that holds it (a "
                "cycle); a config's values are a tree: copy the values instead"
            )
        open_.add(key)
        children = node.value if isinstance(node.value, list) else []
        total = 1
        for child in children:
            for part in child if isinstance(child, tuple) else (child,):
                total += size(part)
        open_.discard(key)
        sizes[key] = total
        if total - len(sizes) > MAX_ALIAS_VALUES:
            raise ConfigError(
                f"{_where(node.start_mark)}: its aliases expand this node to {total:,} values "
                f"where {len(sizes):,} are written, more than the {MAX_ALIAS_VALUES:,} that "
                'aliases may add (a "billion laughs" file asks for billions): write the values '
                "out, or reuse a block with Hydra's defaults list"
            )
        return total

    if root is not None:
        size(root)


@contextlib.contextmanager
def bounded_yaml() -> Iterator[None]:
    """Within it, every YAML file OmegaConf loads (Hydra loads through it) is bounded.

    OmegaConf's ``OmegaConf.load`` looks its loader up when it is called
    (``omegaconf._utils.get_yaml_loader``); the loader is swapped for the bounded one here and put
    back after, under a lock (one load at a time).
    """
    from omegaconf import _utils

    with _SWAP:
        original = _utils.get_yaml_loader
        _utils.get_yaml_loader = lambda: _bounded(original())
        try:
            yield
        finally:
            _utils.get_yaml_loader = original


def yaml_problem(error: Exception) -> str:
    """PyYAML's `error` (a ``yaml.YAMLError``) as a config problem naming the file and line."""
    import yaml

    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = _where(mark) if mark is not None else "config file"
    problem = str(getattr(error, "problem", None) or error)
    if (
        isinstance(error, yaml.constructor.ConstructorError)
        and "constructor for the tag" in problem
    ):
        tag = problem.rpartition("tag ")[2].strip("'").replace("tag:yaml.org,2002:", "!!")
        return (
            f"{where}: the tag {tag} is not plain YAML; a config holds mappings, lists, strings, "
            "numbers, booleans and null, and builds objects from a _target_"
        )
    return f"{where}: not valid YAML: {' '.join(problem.split())}"


def text_problem(path: Path) -> str | None:
    """Why the file at `path` is not UTF-8 text (the line of its first bad byte), or None."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return (
            f"config file {str(path)!r}, line {line}: not UTF-8 text (byte "
            f"0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        )
    return None
