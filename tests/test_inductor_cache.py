"""The inductor cache of the compiled tests (the root ``conftest.py``): the checkout's own, one per
instruction set, unless the run is given one; cleared of the libraries a killed compile left cut
short."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from conftest import CACHE, drop_cut_short_libraries, keep_in_checkout, sweep


def test_the_compiled_tests_use_the_checkouts_cache_unless_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    # one directory per instruction set: inductor's cache keys leave it out
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    here = CACHE / "torchinductor" / f"{platform.machine()}-AVX2"
    assert keep_in_checkout() == here
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(here)
    assert os.environ["TRITON_CACHE_DIR"] == str(CACHE / "triton")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert keep_in_checkout() == CACHE / "torchinductor" / f"{platform.machine()}-DEFAULT"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere/inductor")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert keep_in_checkout() == Path("/elsewhere/inductor")
    assert "TRITON_CACHE_DIR" not in os.environ  # triton's goes with the one given


def linked(directory: Path) -> bytes:
    """A shared library as the C++ compiler inductor builds with links it."""
    compiler = shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (the compiled tests need one too)")
    (directory / "kernel.cpp").write_text('extern "C" int kernel() { return 1; }\n')
    library = directory / "kernel.so"
    command = [compiler, "-shared", "-fPIC", str(directory / "kernel.cpp"), "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True)
    return library.read_bytes()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inductor's libraries are ELF")
def test_libraries_cut_short_are_dropped_and_whole_ones_or_ones_being_built_are_kept(
    tmp_path: Path,
) -> None:
    whole = linked(tmp_path)
    files = {
        "ab/cwhole.main.so": whole,
        "ab/cempty.main.so": b"",
        "ab/chalf.main.so": whole[: len(whole) // 2],
        "cd/clast.so": whole[:-1],
        "cd/cbuilding.so": whole[:1000],
        "cd/cwhole.py": b"",  # not a library: inductor writes its sources whole (a rename)
    }
    cache = tmp_path / "cache"
    for name, data in files.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(data)
    (cache / "locks").mkdir()
    with FileLock(str(cache / "locks" / "cbuilding.lock")):  # a compile building it now
        dropped = drop_cut_short_libraries(cache)
    assert [p.relative_to(cache).as_posix() for p in dropped] == [
        "ab/cempty.main.so",
        "ab/chalf.main.so",
        "cd/clast.so",
    ]
    assert sorted(p.relative_to(cache).as_posix() for p in cache.glob("??/*")) == [
        "ab/cwhole.main.so",
        "cd/cbuilding.so",
        "cd/cwhole.py",
    ]
    assert drop_cut_short_libraries(cache) == [cache / "cd" / "cbuilding.so"]  # let go


def test_a_directory_the_user_chose_and_libraries_not_inductors_are_left_alone(
    tmp_path: Path,
) -> None:
    cut = b"\x7fELF" + b"\x00" * 10  # cut short: no header to speak of
    users = tmp_path / "users"
    for name in ("ab/cempty.so", "lib/libc.so", "ab/libother.so"):
        (users / name).parent.mkdir(parents=True, exist_ok=True)
        (users / name).write_bytes(cut)
    assert sweep(users) == []  # not the checkout's cache: nothing read, nothing written
    assert sorted(p.relative_to(users).as_posix() for p in users.rglob("*")) == [
        "ab",
        "ab/cempty.so",
        "ab/libother.so",
        "lib",
        "lib/libc.so",
    ]
    assert drop_cut_short_libraries(users) == [users / "ab" / "cempty.so"]  # inductor's name only
    assert (users / "lib" / "libc.so").exists() and (users / "ab" / "libother.so").exists()
