"""The documentation users get: it cites no developer-only files, covers every method and metric, and its
links resolve."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import xcnn
from xcnn.cli import build_parser
from xcnn.metrics.harness import METRICS

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
#: paths of the developers' folder, which users never get
FORBIDDEN = ("shared/", "specs/")
BINARY = {".pyc", ".png", ".jpg", ".jpeg", ".safetensors", ".pt", ".npy"}


def _text_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in BINARY:
            continue
        if suffixes is None or path.suffix in suffixes:
            files.append(path)
    return files


def _user_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _strip_fences(markdown: str) -> str:
    """Markdown without its fenced code blocks (a ``#`` comment there is not a heading)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def _strip_code(markdown: str) -> str:
    """Markdown without code blocks and inline code spans (their brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(markdown))


def _headings(markdown: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _strip_fences(markdown), re.M)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(path.read_text(encoding="utf-8")):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _section_names(names: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """For each name, the headings of docs/methods.md that carry it (in backticks) and no other name."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for heading in _headings(METHODS_DOC.read_text(encoding="utf-8")):
        ticked = set(re.findall(r"`([^`]+)`", heading)) & set(names)
        if len(ticked) == 1:
            found[ticked.pop()].append(heading)
    return found


def test_slug_follows_github():
    assert slug("Grad-CAM++ (`gradcam++`)") == "grad-cam-gradcam"
    assert slug("Integrated Gradients (`integrated_gradients`)") == "integrated-gradients-integrated_gradients"
    assert slug("The CAM family") == "the-cam-family"


def test_no_source_file_cites_the_developers_folder():
    files = _text_files(ROOT / "src")
    assert any(p.name == "cli.py" for p in files)  # the walk found the package
    offenders = [
        f"{p.relative_to(ROOT)}: {bad}"
        for p in files
        for bad in FORBIDDEN
        if bad in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"cite docs/methods.md instead: {offenders}"


def test_no_user_document_or_script_cites_the_developers_folder():
    files = [*_user_docs(), *_text_files(ROOT / "benchmarks", (".py",)), *_text_files(ROOT / "experiments", (".py",))]
    offenders = [f"{p.relative_to(ROOT)}: {bad}" for p in files for bad in FORBIDDEN if bad in p.read_text("utf-8")]
    assert not offenders, f"cite docs/methods.md instead: {offenders}"


def _all_help(parser: argparse.ArgumentParser, prog: str = "xcnn") -> dict[str, str]:
    """``--help`` of the parser and of every subcommand, nested ones included."""
    out = {prog: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_all_help(sub, f"{prog} {name}"))
    return out


def test_no_cli_help_cites_the_developers_folder():
    helps = _all_help(build_parser())
    assert {"xcnn explain", "xcnn evaluate", "xcnn train benchmark", "xcnn train tame", "xcnn demo"} <= set(helps)
    offenders = [prog for prog, text in helps.items() for bad in FORBIDDEN if bad in text]
    assert not offenders, f"--help of {offenders} cites the developers' folder"


def test_every_explainer_has_its_own_section():
    names = xcnn.list_explainers()
    assert "mdm" in names and "gradcam" in names
    missing = [name for name, headings in _section_names(names).items() if not headings]
    assert not missing, f"docs/methods.md has no heading with `{missing}` in backticks"


def test_every_harness_metric_has_its_own_section():
    missing = [name for name, headings in _section_names(METRICS).items() if not headings]
    assert not missing, f"docs/methods.md has no heading with `{missing}` in backticks"


def _links(path: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _strip_code(path.read_text(encoding="utf-8")))


def test_relative_links_point_to_files_and_headings_that_exist():
    checked, broken = 0, []
    for doc in _user_docs():
        for link in _links(doc):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            path = (doc.parent / target).resolve() if target else doc
            checked += 1
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {link} (no such heading)")
    assert checked > 0
    assert not broken, broken


def test_pointers_to_methods_sections_resolve():
    """Docstrings, help texts and docs point at sections as ``docs/methods.md#anchor``: each anchor exists."""
    known = anchors(METHODS_DOC)
    files = [
        *_text_files(ROOT / "src", (".py", ".j2")),
        *_text_files(ROOT / "benchmarks", (".py",)),
        *_text_files(ROOT / "experiments", (".py",)),
        *_user_docs(),
    ]
    pointers = [
        (p.relative_to(ROOT), anchor)
        for p in files
        for anchor in re.findall(r"methods\.md#([\w-]+)", p.read_text(encoding="utf-8"))
    ]
    assert pointers, "nothing points into docs/methods.md"
    broken = [f"{p}: #{a}" for p, a in pointers if a not in known]
    assert not broken, f"no such heading in docs/methods.md: {broken}"


def test_methods_doc_is_linked_from_the_readme_and_the_architecture():
    assert "docs/methods.md" in _links(ROOT / "README.md")
    assert "methods.md" in _links(ROOT / "docs" / "architecture.md")
