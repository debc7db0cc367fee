"""Plant known bugs one at a time in a scratch copy of the checkout and check that the tests catch each one.

    .venv/bin/python scripts/check_planted_bugs.py                 # every bug, against the tests listed for it
    .venv/bin/python scripts/check_planted_bugs.py --full          # every bug, against the whole suite (slow)
    .venv/bin/python scripts/check_planted_bugs.py phi3_long_factors eval_question   # some of them

The bugs are in `scripts/planted_bugs.yaml`: each is one or more text replacements in `src/` (found wherever the
text is, so a bug survives modules being moved or renamed) and the tests expected to catch it. A replacement whose
text is no longer in the source is reported as stale: update the bug with the code, do not drop it. Before any bug
is planted, the listed tests must pass on the unmodified copy, else a "caught" would mean nothing.
Run it before a change that claims "no behaviour change" (a refactor), and add a bug for each regression a test
missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "scripts" / "planted_bugs.yaml"


@dataclass
class Bug:
    name: str
    why: str
    edits: list[dict]
    tests: list[str]


def read_bugs(path: Path = SPEC) -> list[Bug]:
    return [Bug(name=b["name"], why=b["why"], edits=b["edits"], tests=b["tests"]) for b in yaml.safe_load(path.read_text())]


def scratch_copy(dest: Path) -> None:
    """The files git knows (tracked, and untracked but not ignored), as they are in the working tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def plant(tree: Path, bug: Bug) -> list[str]:
    """Apply every replacement of `bug` under tree/src; return problems (a stale text), empty when planted."""
    problems = []
    sources = sorted((tree / "src").rglob("*.py"))
    for edit in bug.edits:
        hits = [p for p in sources if edit["find"] in p.read_text()]
        if not hits:
            problems.append(f"stale: no file under src/ contains {edit['find']!r}")
        for p in hits:
            p.write_text(p.read_text().replace(edit["find"], edit["replace"]))
    return problems


def run_tests(tree: Path, tests: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"),
           "CAPTUNE_FIXTURES": os.environ.get("CAPTUNE_FIXTURES", str(ROOT.parent / "shared" / "fixtures"))}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *tests]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for each bug, not its listed tests")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders and logs")
    args = parser.parse_args(argv)

    bugs = read_bugs()
    unknown = set(args.names) - {b.name for b in bugs}
    if unknown:
        parser.error(f"unknown bug(s): {', '.join(sorted(unknown))}")
    bugs = [b for b in bugs if not args.names or b.name in args.names]
    work = Path(tempfile.mkdtemp(prefix="captune-planted-"))
    clean = work / "clean"
    scratch_copy(clean)

    baseline = [] if args.full else sorted({t for b in bugs for t in b.tests})
    print(f"baseline: {'the whole suite' if args.full else ' '.join(baseline)}", flush=True)
    if run_tests(clean, baseline, work / "baseline.log") != 0:
        print(f"the tests fail without any bug planted; see {work / 'baseline.log'}")
        return 1

    missed = []
    for bug in bugs:
        tree = work / bug.name
        shutil.copytree(clean, tree)
        problems = plant(tree, bug)
        if problems:
            print(f"STALE   {bug.name}: " + "; ".join(problems), flush=True)
            missed.append(bug.name)
            continue
        start = time.monotonic()
        code = run_tests(tree, [] if args.full else bug.tests, work / f"{bug.name}.log")
        verdict = {0: "MISSED", 1: "caught"}.get(code, f"caught (pytest exit {code})")
        print(f"{verdict:<8}{bug.name} ({time.monotonic() - start:.0f} s): {bug.why}", flush=True)
        if code == 0:
            missed.append(bug.name)
        elif not args.keep:
            shutil.rmtree(tree)
    print(f"{len(bugs) - len(missed)} of {len(bugs)} planted bugs caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    if args.keep or missed:
        print(f"scratch folders and logs in {work}")
    else:
        shutil.rmtree(work)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
