"""Kill a training command at random moments, resume it until it finishes, and compare with an uninterrupted run.

For each recipe (``xcnn train lap``, ``xcnn train protopnet``, ``xcnn train cgc``) on a tiny ShapesNet and
synthetic data: one uninterrupted run gives the reference; then ``--kills`` runs are each SIGKILLed at a random
moment (uniform over the reference run's duration, seeded), resumed with ``--resume`` (killed again with
probability 1/2 at another random moment, up to three times) until they exit 0. Every finished run must

- leave no temporary file (``.NAME.XXXXXXXX.tmp*``) anywhere in its folder,
- load with ``xcnn.load_model(folder)``, and
- hold weights identical to the reference run's, and the same ``history.json``.

    python tools/kill_resume.py --kills 10 --seed 0          # exit 1 if any run breaks a rule
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")
DATA = ["--data", "synthetic", "--n-train", "96", "--n-val", "16", "--n-test", "16", "--batch-size", "16"]
RECIPES = {
    "lap": ["train", "lap", "--epochs", "3"],
    "protopnet": ["train", "protopnet", "--prototypes-per-class", "1", "--dim", "8", "--warm-epochs", "1",
                  "--joint-epochs", "1", "--last-epochs", "1", "--cycles", "2"],
    "cgc": ["train", "cgc", "--epochs", "3"],
}  # fmt: skip


def _base_model(folder: Path) -> Path:
    """A tiny random-weight ShapesNet (6 classes, 32x32), saved as an xcnn model folder."""
    import torch

    import xcnn
    from xcnn.models import save_model
    from xcnn.nets import ShapesNet

    torch.manual_seed(0)
    spec = {"arch": "shapesnet", "kwargs": {"num_classes": 6, "widths": [8, 8, 16, 16]}}
    net = xcnn.Classifier(ShapesNet(6, widths=(8, 8, 16, 16)), name="shapesnet", input_size=(32, 32), spec=spec)
    return save_model(net, folder)


def _command(recipe: str, model: Path, out: Path, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "xcnn.cli", *RECIPES[recipe], "--model", str(model), "--out", str(out), *DATA]
    return [*argv, "--device", "cpu", *(["--resume"] if resume else [])]


def _run(argv: list[str], kill_after: float | None) -> tuple[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{' '.join(argv[2:])} failed ({proc.returncode}): {proc.stderr.read().decode()[-800:]}")
    return proc.returncode, time.perf_counter() - start


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def check(recipe: str, folder: Path, reference: Path) -> list[str]:
    """The rules a finished run must satisfy (empty list: all hold)."""
    import torch

    import xcnn

    problems = [f"temporary file left: {p.relative_to(folder)}" for p in folder.rglob("*") if TEMPORARY.match(p.name)]
    try:
        xcnn.load_model(folder)
    except Exception as err:
        problems.append(f"does not load: {type(err).__name__}: {err}")
    ours, ref = _weights(folder), _weights(reference)
    if ours.keys() != ref.keys() or not all(torch.equal(ours[k], ref[k]) for k in ref):
        problems.append("weights differ from the uninterrupted run")
    if json.loads((folder / "history.json").read_text()) != json.loads((reference / "history.json").read_text()):
        problems.append("history.json differs from the uninterrupted run")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="interrupted runs per recipe (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="xcnn-kill-") as tmp:
        root = Path(tmp)
        model = _base_model(root / "base")
        for recipe in args.recipes.split(","):
            reference = root / f"{recipe}-reference"
            _, duration = _run(_command(recipe, model, reference, False), None)
            kills = 0
            for run in range(args.kills):
                out = root / f"{recipe}-{run}"
                moment = rng.uniform(0.05, 1.0) * duration
                code, _ = _run(_command(recipe, model, out, False), moment)
                kills += code != 0
                resumes = 0
                while code != 0:
                    again = rng.random() < 0.5 and resumes < 3
                    code, _ = _run(
                        _command(recipe, model, out, True), rng.uniform(0.05, 1.0) * duration if again else None
                    )
                    kills += code != 0
                    resumes += 1
                problems = check(recipe, out, reference)
                failures += bool(problems)
                status = "ok" if not problems else "FAIL: " + "; ".join(problems)
                print(f"{recipe} run {run}: first kill at {moment:.1f} s, {resumes} resumes: {status}", flush=True)
                shutil.rmtree(out)
            print(f"{recipe}: {args.kills} runs, {kills} SIGKILLs, reference {duration:.1f} s", flush=True)
    print("all runs finished identical to the uninterrupted ones" if not failures else f"{failures} runs broke a rule")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
