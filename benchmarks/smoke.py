"""Smoke run of every benchmark script: its fast mode runs, and writes nothing into the tree.

A benchmark nobody ran since the code changed is a page that can no longer be regenerated.
This runs each script of ``benchmarks/`` that has a smoke mode (``--fast``, or ``--dry-run``,
in its ``--help``) in a clean clone of the repository's last commit, with its outputs sent to
a scratch folder outside the clone (``--out``, and ``--markdown`` where a script has it), and
reports per script:

  rc        the exit status (0 expected; 124: killed at ``--timeout``)
  wall      seconds it ran
  written   files it left in the clone (``git status --ignored``): a smoke run must write
            only where it is told; a plain ``--fast`` once replaced a committed page

Scripts without a smoke mode are listed as such. The clone is reset (``git checkout``,
``git clean -fdx``) between scripts, so each starts from the commit. The exit status is 1 when
any script fails or writes into the tree. ``tests/test_benchmark_smoke.py`` is the known
answer: scripts that pass, fail, time out, litter the tree or have no smoke mode must each be
judged so.

Usage (from the repository root, in the project's venv; about 45 min on 2 cores for all):
  python benchmarks/smoke.py                       # every script with a smoke mode
  python benchmarks/smoke.py --only quality,sharing --timeout 300
Uncommitted changes are not in the clone: commit first.
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

ROOT = Path(__file__).resolve().parents[1]
#: scripts that are not benchmarks (this one)
NOT_BENCHMARKS = {"smoke"}


@dataclass
class Verdict:
    """What one script's smoke run did."""

    name: str
    rc: int | None  #: None: no smoke mode
    wall_s: float = 0.0
    written: tuple[str, ...] = ()
    last_line: str = ""

    @property
    def ok(self) -> bool:
        """A smoke run that exited 0 and wrote only where it was told (or no smoke mode)."""
        return self.rc is None or (self.rc == 0 and not self.written)


def scripts(repo: Path, only: list[str] | None = None) -> list[str]:
    """Names of the benchmark scripts of ``repo`` (``only``: these, which must exist)."""
    names = sorted(p.stem for p in (repo / "benchmarks").glob("*.py"))
    names = [n for n in names if n not in NOT_BENCHMARKS and not n.startswith("_")]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"No benchmark script(s) {unknown}; they are {names}.")
        names = [n for n in names if n in only]
    return names


def _run(cmd: list[str], cwd: Path, timeout: float, log: Path) -> tuple[int, float]:
    """``cmd`` in ``cwd`` with its output to ``log``: (exit status, wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _git(clone: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=clone, check=True, capture_output=True, text=True
    ).stdout


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def smoke_one(name: str, clone: Path, scratch: Path, timeout: float) -> Verdict:
    """Run ``benchmarks/<name>.py`` in its fast mode in ``clone``; reset the clone after."""
    script = f"benchmarks/{name}.py"
    out = scratch / name
    out.mkdir(parents=True, exist_ok=True)
    rc, _ = _run([sys.executable, script, "--help"], clone, 120, out / "help.txt")
    usage = (out / "help.txt").read_text(errors="replace")
    try:
        # gpu_check's smoke mode is its CPU dry run
        flag = next((f for f in ("--fast", "--dry-run") if f in usage), None)
        if rc != 0 or flag is None:
            return Verdict(name, None if rc == 0 else rc, last_line=_last_line(out / "help.txt"))
        cmd = [sys.executable, script, flag]
        if "--out" in usage:
            cmd += ["--out", str(out / "out")]
        if "--markdown" in usage:
            cmd += ["--markdown", str(out / f"{name}.md")]
        rc, wall = _run(cmd, clone, timeout, out / "log.txt")
        status = _git(clone, "status", "--porcelain", "--ignored", "--untracked-files=all")
        written = tuple(
            line[3:] for line in status.splitlines() if "__pycache__" not in line and line.strip()
        )
        return Verdict(name, rc, wall, written, _last_line(out / "log.txt"))
    finally:
        _git(clone, "checkout", "--", ".")
        _git(clone, "clean", "-fdxq")


def make_clone(repo: Path, where: Path) -> Path:
    """A clone of ``repo``'s last commit in ``where``, with the shared data beside it."""
    clone = where / "repo"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    shared = repo.parent / "shared"
    if shared.exists():  # benchmarks read ../shared/data, as from the repository
        (where / "shared").symlink_to(shared.resolve())
    return clone


def report(verdicts: list[Verdict]) -> str:
    """A markdown table of the verdicts, failures first."""
    rows = sorted(verdicts, key=lambda v: (v.ok, v.rc is None, v.name))
    lines = ["| script | verdict | rc | wall (s) | written into the tree / last line |"]
    lines.append("|---|---|---|---|---|")
    for v in rows:
        if v.rc is None:
            lines.append(f"| {v.name} | no smoke mode | | | |")
            continue
        verdict = "ok" if v.ok else ("WRITES INTO THE TREE" if v.rc == 0 else "FAILS")
        detail = ", ".join(v.written) if v.written else ("" if v.ok else v.last_line)
        lines.append(f"| {v.name} | {verdict} | {v.rc} | {v.wall_s:.0f} | {detail} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated script names")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per script")
    parser.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this)")
    parser.add_argument(
        "--keep", default=None, help="folder to keep the logs in (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    only = [s for s in args.only.split(",") if s] if args.only else None
    names = scripts(repo, only)
    with tempfile.TemporaryDirectory(prefix="scbranch-smoke-") as tmp:
        scratch = Path(args.keep).resolve() if args.keep else Path(tmp) / "logs"
        clone = make_clone(repo, Path(tmp))
        verdicts = []
        for name in names:
            verdicts.append(smoke_one(name, clone, scratch, args.timeout))
            v = verdicts[-1]
            state = "no smoke mode" if v.rc is None else f"rc {v.rc}, {v.wall_s:.0f} s"
            print(f"{name}: {state}{', WRITES ' + str(list(v.written)) if v.written else ''}")
            sys.stdout.flush()
        print()
        print(report(verdicts))
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    failed = [v.name for v in verdicts if not v.ok]
    print(
        f"\n{len(verdicts) - len(failed)} of {len(verdicts)} ok"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
