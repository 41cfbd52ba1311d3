"""Check that results pages rebuild from their data files alone, byte for byte.

Usage, from the repository root (with poslab and matplotlib installed):

    python docs/results/check_data.py                 every page that has a data file
    python docs/results/check_data.py cope_flipflop dape_chomsky/investigation/reverse_string_steps4

Each page's top folder (``docs/results/<name>``) is copied into a temporary directory without its
run folders (``seed<k>/``) and without what the page's command builds; the command then runs there
with ``--page-only`` and the rebuilt files must equal the committed ones, and every image the page
shows must be drawn again (its bytes may differ with matplotlib's version). Two kinds of page:

- a study's (``poslab study|reproduce|lm-study NAME --out docs/results/NAME``, the first code block
  of its README.md): README.md and results.csv, and each LM part's own report (table.md,
  results.csv, results.json) compared; plots/ and the parts' ppl_*.png drawn again;
- a grid's (a folder with grid.json and table.md, made by ``poslab compare``): rebuilt by
  ``poslab report`` of its encodings' folders in the grid's order; table.md, results.csv,
  results.json and lengths.csv compared, its *.png drawn again.

Prints one line per page and exits with status 1 when any page differs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path("docs/results")
STUDY_COMMANDS = ("study", "reproduce", "lm-study")
PART_REPORT = ("table.md", "results.csv", "results.json")
GRID_REPORT = ("table.md", "results.csv", "results.json", "lengths.csv")


def study_command(page: Path) -> list[str] | None:
    """The command in the first code block of a study page's README.md, or None."""
    readme = REPO / page / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^```\n(poslab [^\n]+)\n```", readme.read_text(), re.MULTILINE)
    if match is None:
        return None
    words = shlex.split(match.group(1))
    return words[1:] if words[1] in STUDY_COMMANDS else None


def grid_command(page: Path) -> list[str]:
    """``report`` of a compare grid's encodings' folders, in the grid's order."""
    sys.path.insert(0, str(REPO / "src"))
    from poslab.lab.config import encoding_label, slug

    request = json.loads((REPO / page / "grid.json").read_text())
    folders = [str(page / slug(encoding_label(spec))) for spec in request["encodings"]]
    return ["report", *folders, "--out", str(page)]


def pages() -> list[Path]:
    """Every page below docs/results that has a data file in its folder or above it."""
    found = []
    for folder in sorted(p for p in (REPO / RESULTS).rglob("*") if p.is_dir()):
        page = folder.relative_to(REPO)
        if study_command(page) or ((folder / "grid.json").is_file() and (folder / "table.md").is_file()):
            found.append(page)
    return found


def has_data(page: Path) -> bool:
    return any((REPO / folder / "data.jsonl").is_file() for folder in (page, *page.parents))


def built(page: Path, study: bool) -> list[Path]:
    """The committed files the page's command builds, relative to the repository."""
    folder = REPO / page
    if not study:
        return [page / name for name in GRID_REPORT if (folder / name).is_file()]
    files = [page / "README.md", page / "results.csv"]
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (part / "results.json").is_file() and not (part / "config.json").is_file():
            files += [part.relative_to(REPO) / name for name in PART_REPORT]
    return files


def images(page: Path, study: bool) -> list[Path]:
    """The images the page shows (a study's README links) or holds (a grid's *.png)."""
    if not study:
        return sorted(p.relative_to(REPO) for p in (REPO / page).glob("*.png"))
    text = (REPO / page / "README.md").read_text()
    shown = [page / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)]
    parts = {p.parent for p in built(page, study) if p.name == "results.json"}  # each LM part's report
    return sorted({*shown, *(p.relative_to(REPO) for part in parts for p in (REPO / part).glob("*.png"))})


def copy_without_runs(page: Path, root: Path, remove: list[Path]) -> None:
    """The page's top folder below ``root``, without run folders and without ``remove``."""
    top = Path(*page.parts[:3])
    shutil.copytree(
        REPO / top,
        root / top,
        ignore=lambda _, names: [n for n in names if re.fullmatch(r"seed\d+", n) or n == "plots"],
    )
    for path in remove:
        (root / path).unlink(missing_ok=True)


def check(page: Path) -> tuple[bool, str]:
    command = study_command(page)
    study = command is not None
    if not study:
        command = grid_command(page)
    compare = built(page, study)
    pictures = images(page, study)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        copy_without_runs(page, root, [*compare, *pictures])
        left = [p for p in (root / page).rglob("*") if re.fullmatch(r"seed\d+", p.name)]
        assert not left, left
        args = [*command, "--page-only"] if study else command
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, "-m", "poslab", *args], cwd=root, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            return False, f"`poslab {shlex.join(args)}` failed: {done.stderr.strip().splitlines()[-1]}"
        differ = [str(p) for p in compare if (root / p).read_bytes() != (REPO / p).read_bytes()]
        missing = [str(p) for p in pictures if not (root / p).is_file()]
    ok = not differ and not missing
    what = ", ".join(p.name if p.parent == page else str(p.relative_to(page)) for p in compare)
    line = f"`poslab {shlex.join(args)}` from the data file alone: {what} "
    line += "identical" if not differ else f"DIFFER: {', '.join(differ)}"
    line += f"; {len(pictures)} image(s) drawn again" + (
        f", MISSING: {', '.join(missing)}" if missing else ""
    )
    return ok, line


def main(names: list[str]) -> int:
    os.chdir(REPO)
    todo = [RESULTS / name for name in names] if names else pages()
    failed = 0
    for page in todo:
        if not (REPO / page).is_dir():
            print(f"{page}: no such page")
            failed += 1
            continue
        if not has_data(page):
            print(f"{page}: no data file (not migrated); skipped")
            failed += bool(names)
            continue
        ok, line = check(page)
        failed += not ok
        print(f"{page}: {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
