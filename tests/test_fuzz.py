"""The seeded fuzz of the public surface (tools/fuzz.py), in a short form: only clear errors or valid results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("xcnn_fuzz", ROOT / "tools" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["xcnn_fuzz"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_fuzz_gives_only_clear_errors_or_valid_results(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--calls", "250", "--seed", "0", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["raw"] == [], proc.stdout[-4000:]
    assert proc.returncode == 0
    # the draw reaches both sides: calls that run through and calls that are refused
    assert summary["outcomes"].get("ok", 0) >= 20 and summary["outcomes"].get("refused", 0) >= 100


def test_fuzz_counts_a_raw_exception_and_a_nonsense_result_as_failures():
    fuzz = _fuzz_module()

    def index_error(ctx):
        return "indexes past the end", lambda: [][1], None

    def nan_result(ctx):
        return "returns NaN", lambda: float("nan"), fuzz._finite

    def refusal(ctx):
        return "refuses", lambda: int("x"), None

    fuzz.CASES.clear()
    fuzz.CASES.update({"index_error": index_error, "nan_result": nan_result, "refusal": refusal})
    summary = fuzz.run(12, seed=0)
    kinds = {r["case"] for r in summary["raw"]}
    assert kinds == {"index_error", "nan_result"}
    assert summary["outcomes"]["raw"] + summary["outcomes"]["refused"] == 12
    index_errors = sum(r["case"] == "index_error" for r in summary["raw"])
    assert summary["exceptions"] == {"IndexError": index_errors}


def test_fuzz_cli_outcomes_are_judged_by_exit_status_and_message(tmp_path):
    fuzz = _fuzz_module()
    with pytest.raises(ValueError, match="--n"):  # a usage error, one line
        fuzz._run_cli(["inspect", "--n", "-5"])
    with pytest.raises(ValueError, match="unknown method"):  # a one-line `xcnn explain: error: ...`
        fuzz._run_cli(["explain", "x.png", "--method", "nope", "--out", str(tmp_path)])
