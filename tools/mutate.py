"""Mutation check: does a test catch each bug a real change could introduce?

Each mutant in ``tools/mutants/*.toml`` replaces one piece of source text with a plausible bug and names the
test files that should catch it::

    [[mutant]]
    id = "cgc-tau-ignored"
    what = "CGC: the temperature hard-coded, the tau argument ignored"
    file = "src/xcnn/training/cgc.py"
    find = '''logits / tau'''
    replace = '''logits / 0.5'''
    tests = ["tests/test_cgc.py"]

The runner copies the working tree (tracked and untracked, not ignored files) into a temporary folder, applies
one mutant at a time there, and runs ``pytest -x`` on its tests with that copy first on ``sys.path``: the
working tree itself is never modified, so this can run while you keep editing. A mutant is *killed* when
its tests fail, *survived* when they pass. ``find`` must occur exactly once in ``file`` (a stale mutant is
reported as an error, not counted), and the mutated file must still compile.

    python tools/mutate.py                      # every mutant
    python tools/mutate.py --only cgc-tau-ignored --only ...
    python tools/mutate.py --list
    python tools/mutate.py --check              # only check that every mutant still applies (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "tools" / "mutants"


@dataclass(frozen=True)
class Mutant:
    id: str
    what: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    source: str  # the .toml that defines it

    def apply(self, text: str) -> str:
        count = text.count(self.find)
        if count != 1:
            raise ValueError(f"mutant {self.id}: its find text occurs {count} times in {self.file}, not once")
        mutated = text.replace(self.find, self.replace)
        compile(mutated, self.file, "exec")  # a syntax error is not a bug a test should catch
        return mutated


def load_mutants(folder: Path = MUTANTS) -> list[Mutant]:
    """Every mutant of ``folder/*.toml``; ids unique, fields checked."""
    mutants: list[Mutant] = []
    for path in sorted(folder.glob("*.toml")):
        for entry in tomllib.loads(path.read_text()).get("mutant", []):
            missing = {"id", "what", "file", "find", "replace", "tests"} - set(entry)
            if missing:
                raise ValueError(f"{path.name}: mutant {entry.get('id', '?')} lacks {sorted(missing)}")
            if entry["find"] == entry["replace"]:
                raise ValueError(f"{path.name}: mutant {entry['id']} changes nothing")
            fields = {key: entry[key] for key in ("id", "what", "file", "find", "replace")}
            mutants.append(Mutant(**fields, tests=tuple(entry["tests"]), source=path.name))
    ids = [m.id for m in mutants]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"mutant ids must be unique: {dupes}")
    return mutants


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run(mutants: list[Mutant], timeout: float) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="xcnn-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        env = {**os.environ, "PYTHONPATH": str(copy / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for m in mutants:
            path = copy / m.file
            original = path.read_text()
            row = {"id": m.id, "what": m.what, "file": m.file, "tests": list(m.tests)}
            try:
                path.write_text(m.apply(original))
            except (ValueError, SyntaxError) as err:
                results.append({**row, "status": "error", "detail": str(err)})
                print(f"ERROR     {m.id}: {err}", flush=True)
                continue
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                    cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                )  # fmt: skip
                code = proc.returncode
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            except subprocess.TimeoutExpired:
                code, tail = -1, [f"timed out after {timeout} s"]
            finally:
                path.write_text(original)
            # pytest: 0 all passed, 1 a test failed; anything else (usage, collection) is an error
            status = {0: "survived", 1: "killed"}.get(code, "error")
            seconds = round(time.perf_counter() - start, 1)
            results.append({**row, "status": status, "seconds": seconds, "detail": " | ".join(tail)})
            print(f"{status.upper():<9} {m.id} ({seconds} s): {m.what}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only this mutant id (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check that every mutant applies, run no test")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    mutants = load_mutants()
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutants})
        if unknown:
            parser.error(f"unknown mutant ids {unknown}")
        mutants = [m for m in mutants if m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:<40} {m.file:<40} {m.what}")
        return 0
    if args.check:
        for m in mutants:
            m.apply((ROOT / m.file).read_text())
        print(f"{len(mutants)} mutants apply")
        return 0
    results = run(mutants, args.timeout)
    counted = [r for r in results if r["status"] != "error"]
    killed = sum(r["status"] == "killed" for r in counted)
    errors = len(results) - len(counted)
    print(f"\n{killed} of {len(counted)} mutants killed" + (f"; {errors} could not run" if errors else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if killed == len(counted) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
