"""The bottom-floor helpers: atomic writes, leftovers of interrupted writes, argument checks, JSON reading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest

from xcnn._io import atomic_write, remove_temporaries, write_json
from xcnn._validate import check_memory, check_number, check_numbers, parse_json, physical_memory, read_json


def test_temporaries_of_a_killed_write_are_found_and_only_they_are_removed(tmp_path):
    # a process killed between writing its temporary file and renaming it (SIGKILL: no cleanup runs)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from xcnn._io import atomic_write
        def write(tmp):
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(Path({str(tmp_path)!r}) / "checkpoint.pt", write)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.") and left[0].endswith(".tmp.pt")
    keep = ["checkpoint.pt", ".hidden", "model.tmp.json", ".x.tmp", ".a.abcdefghi.tmp.pt"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    write_json(tmp_path / "history.json", [1])
    removed = remove_temporaries(tmp_path)
    assert [p.name for p in removed] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "history.json"])
    assert remove_temporaries(tmp_path / "missing") == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail, durable=True)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    atomic_write(target, lambda tmp: tmp.write_text("new"), durable=True)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize(
    ("value", "kwargs", "error"),
    [
        (0, {"low": 0, "low_open": True}, ValueError),
        (float("nan"), {}, ValueError),
        (float("inf"), {"low": 0}, ValueError),
        (True, {}, TypeError),
        ("1", {}, TypeError),
        (1.5, {"integer": True}, TypeError),
        (2, {"high": 1}, ValueError),
        (1, {"high": 1, "high_open": True}, ValueError),
    ],
)
def test_check_number_refuses(value, kwargs, error):
    with pytest.raises(error, match="x must"):
        check_number("x", value, **kwargs)


def test_check_number_accepts_bounds_and_converts():
    assert check_number("x", 0, low=0) == 0.0 and isinstance(check_number("x", 3), float)
    assert check_number("x", 3, integer=True, low=1, high=3) == 3
    assert check_number("x", 10**400, integer=True) == 10**400  # exact, not a float overflow
    with pytest.raises(ValueError, match="x must be in"):
        check_number("x", 10**400, integer=True, high=2**31)


@pytest.mark.parametrize("value", [10**400, -(10**400), Fraction(10**400, 3)])
def test_a_number_beyond_a_float_is_not_finite(value):
    """float(10**400) raises OverflowError: where a float is expected, a huge integer (or fraction) is a
    ValueError saying it is not finite, its text cut short."""
    with pytest.raises(ValueError, match=r"^x must be finite, got (Fraction\()?-?\d{60}") as info:
        check_number("x", value)
    assert len(str(info.value)) < 120
    with pytest.raises(ValueError, match=r"x must be in \(-inf, 3\], got an integer of 16610 bits"):
        check_number("x", 10**5000, integer=True, high=3)  # beyond even repr()'s 4300 digits


def test_check_numbers_takes_any_iterable_of_real_numbers():
    import numpy as np
    import torch

    assert check_numbers("m", [torch.tensor(0.5), np.float32(0.25), 1], 3) == (0.5, 0.25, 1.0)
    assert check_numbers("m", torch.tensor([[1.0], [2.0]]), 2) == (1.0, 2.0)  # tensors and arrays flattened
    assert check_numbers("s", np.array([32, 48]), 2, integer=True) == (32, 48)
    assert check_numbers("s", (32.0, np.float64(48.0)), 2, integer=True) == (32, 48)
    assert check_numbers("s", {7: 0, 8: 0}.keys(), 2, integer=True) == (7, 8)
    assert all(type(v) is int for v in check_numbers("s", (np.int64(3), torch.tensor(4)), 2, integer=True))
    with pytest.raises(ValueError, match=r"^s must be 2 sizes, got <range_iterator"):
        check_numbers("s", iter(range(10**12)), 2, expected="2 sizes")  # read 3 items, not 10**12


@pytest.mark.parametrize(
    ("values", "kwargs", "error", "message"),
    [
        ("ab", {}, TypeError, r"^s must be 2 numbers, got str 'ab'$"),
        (5, {}, TypeError, r"^s must be 2 numbers, got int 5$"),
        ((1, 2, 3), {"expected": "(height, width)"}, ValueError, r"^s must be \(height, width\), got \(1, 2, 3\)$"),
        ((1, 2.5), {"integer": True}, TypeError, r"^s\[1\] must be an integer, got float 2.5$"),
        ((1, float("inf")), {"integer": True}, TypeError, r"^s\[1\] must be an integer, got float inf$"),
        ((1, True), {}, TypeError, r"^s\[1\] must be a number, got bool True$"),
        ((1, "2"), {}, TypeError, r"^s\[1\] must be a number, got str '2'$"),
        ((0, 1), {"low": 1}, ValueError, r"^s\[0\] must be in \[1, inf\), got 0$"),
        ((1, 10**400), {}, ValueError, r"^s\[1\] must be finite"),
    ],
)
def test_check_numbers_refuses(values, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_numbers("s", values, 2, **kwargs)


def test_parse_json_names_where_the_text_came_from():
    assert parse_json('{"a": 1}', "the header of w.safetensors") == {"a": 1}
    with pytest.raises(ValueError, match=r"^cannot read the header of w: Expecting"):
        parse_json("{", "the header of w")
    with pytest.raises(ValueError, match=r"^cannot read the header of w: nested too deeply$"):
        parse_json("[" * 100_000 + "]" * 100_000, "the header of w")
    with pytest.raises(ValueError, match=r"^cannot read the header of w: .*integer string conversion"):
        parse_json("1" * 5000, "the header of w")  # beyond Python's 4300-digit limit: named too


def test_check_memory_names_the_request():
    total = physical_memory()
    assert total is None or total > 2**28
    check_memory(2**20, "a small buffer")
    if total is not None:
        with pytest.raises(ValueError, match=r"a huge layer would need .* GiB"):
            check_memory(total * 2, "a huge layer")
        with pytest.raises(ValueError, match="more than 1e21 GiB"):
            check_memory(10**400, "a 10**400-channel layer")


def test_read_json_errors_name_the_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"model description .*deep\.json: nested too deeply"):
        read_json(deep, "model description")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_json(bad)
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json")
