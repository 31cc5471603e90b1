"""A config file's YAML bounded: aliases, nesting, encoding and tags, each a ConfigError naming the
file and line, and `functrain run` exits 2 with one line instead of a traceback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("hydra")

import functrain as ft  # noqa: E402
from functrain.config.cli import main  # noqa: E402


def billion_laughs() -> str:
    """Nine levels of ten aliases each: 10**9 strings from a few hundred bytes."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{','.join([f'*{previous}'] * 10)}]\n"
    return text


FILES = {
    "billion_laughs": (
        billion_laughs(),
        r"line 4: its aliases expand this node to 11,111 values where 18 are written, more than "
        r"the 10,000 that aliases may add",
    ),
    "nested_lists": (
        "a: " + "[" * 50_000 + "]" * 50_000 + "\n",
        r"line 1: mappings and lists nest deeper than 32 levels here",
    ),
    "cycle": ("a: 1\nb: &b [1, *b]\n", r"line 2: an alias here refers to a node that holds it"),
    "python_tag": (
        "a: 1\nb: !!python/object/apply:os.system [touch pwned]\n",
        r"line 2: the tag !!python/object/apply:os.system is not plain YAML",
    ),
    "path_tag": (  # (OmegaConf's own loader constructs the tags of paths)
        "fit: {checkpoint_dir: !!python/object/apply:pathlib.Path [/tmp/x]}\n",
        r"line 1: the tag !!python/object/apply:pathlib.Path is not plain YAML",
    ),
    "syntax": ("a: 1\nb: [1, 2\nc: 3\n", r"line 3: not valid YAML: expected ',' or '\]'"),
}


@pytest.mark.parametrize(("text", "message"), FILES.values(), ids=FILES)
def test_a_hostile_or_broken_yaml_file_is_a_config_error_naming_its_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(
        ft.ConfigError, match=f"^config file {re.escape(repr(str(path)))}, {message}"
    ):
        ft.load_config(path)
    assert time.perf_counter() - started < 10  # the billion laughs hung before
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("written", "read"), [("010", 8), ("1:30", 90), ("-1:00:00", -3600), ("1:30.5", 90.5)]
)
def test_a_number_yaml_1_1_reads_otherwise_than_its_digits_is_refused(
    tmp_path: Path, written: str, read: float
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"seed: 0\nfit:\n  max_time: {written}\n")
    with pytest.raises(
        ft.ConfigError,
        match=f"^config file {re.escape(repr(str(path)))}, line 3: {re.escape(written)} reads "
        f"as {re.escape(repr(read))} here",
    ):
        ft.load_config(path)
    # quoted, or written as the number, it is what it says
    path.write_text(f"seed: 0\nfit:\n  max_time: '{written}'\n  other: {read}\n")
    assert ft.load_config(path)["fit"] == {"max_time": written, "other": read}
    assert ft.load_config(path, [f"fit.max_time={written}"])["fit"]["max_time"] == written


def test_the_billion_laughs_is_a_few_hundred_bytes() -> None:
    assert len(billion_laughs()) < 450


def test_a_file_that_is_not_utf8_names_the_line_of_its_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes('a: 1\nb: "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(
        ft.ConfigError,
        match=f"^config file {re.escape(repr(str(path)))}, line 2: not UTF-8 text \\(byte 0xe9 at "
        "offset 12\\); save the file as UTF-8$",
    ):
        ft.load_config(path)


def test_a_config_groups_file_is_bounded_too(tmp_path: Path) -> None:
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "laughs.yaml").write_text(billion_laughs())
    (tmp_path / "run.yaml").write_text("defaults:\n  - optimizer: laughs\n  - _self_\nlr: 1\n")
    group = tmp_path / "optimizer" / "laughs.yaml"
    with pytest.raises(ft.ConfigError, match=f"^config file {re.escape(repr(str(group)))}, line 4"):
        ft.load_config(tmp_path / "run.yaml")


def test_nesting_within_the_bound_loads(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("a: " + "[" * 30 + "1" + "]" * 30 + "\n")
    value = ft.load_config(path)["a"]
    for _ in range(30):
        value = value[0]
    assert value == 1


@pytest.mark.parametrize("name", ["billion_laughs", "nested_lists", "python_tag"])
@pytest.mark.parametrize("flag", [[], ["--print-config"]])
def test_the_command_prints_the_error_without_a_traceback_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flag: list[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(FILES[name][0])
    assert main(["run", str(path), *flag]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"functrain run: config file {str(path)!r}, line ")
    assert err.count("\n") == 1


def test_interpolations_that_multiply_are_refused_before_they_are_resolved(
    tmp_path: Path,
) -> None:
    # as aliases: each level names the last ten times (a few hundred bytes, 10**9 characters)
    lines = ["s0: xxxxxxxxxx"] + [f"s{i}: '" + f"${{s{i - 1}}}" * 10 + "'" for i in range(1, 9)]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ft.ConfigError, match=r"config key s5: its interpolations would resolve"):
        ft.load_config(path)
    assert time.perf_counter() - started < 10
    lists = ["l0: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + [
        f"l{i}: [" + ", ".join([f"'${{l{i - 1}}}'"] * 10) + "]" for i in range(1, 8)
    ]
    path.write_text("\n".join(lists) + "\n")
    with pytest.raises(ft.ConfigError, match=r"config key l5: its interpolations would resolve"):
        ft.load_config(path)


def test_interpolations_of_a_run_config_resolve(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "steps: 10\nwidth: 8\nfit: {max_steps: '${steps}', log_every: '${ft.mul:${steps},2}'}\n"
        "model: {hidden: '${width}', out: '${..width}', name: 'w${width}-s${steps}'}\n"
    )
    assert ft.load_config(path) == {
        "steps": 10,
        "width": 8,
        "fit": {"max_steps": 10, "log_every": 20},
        "model": {"hidden": 8, "out": 8, "name": "w8-s10"},
    }


def test_interpolations_through_oc_select_or_a_named_key_are_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    for form in ("${{oc.select:s{i}}}", "${{${{n{i}}}}}"):
        lines = ["s0: xxxxxxxxxx"]
        for i in range(1, 9):
            lines += [f"n{i - 1}: s{i - 1}", f"s{i}: '" + form.format(i=i - 1) * 10 + "'"]
        path.write_text("\n".join(lines) + "\n")
        started = time.perf_counter()
        with pytest.raises(ft.ConfigError, match=r"its interpolations would resolve"):
            ft.load_config(path)
        assert time.perf_counter() - started < 10


def test_ft_mul_takes_numbers_only(tmp_path: Path) -> None:
    # ('x' * 50000000: a string of 50 MB from a config of one line)
    path = tmp_path / "run.yaml"
    path.write_text("a: \"${ft.mul:'xxxxxxxxxx',50000000}\"\n")
    with pytest.raises(ft.ConfigError, match="ft.mul takes two numbers"):
        ft.load_config(path)
