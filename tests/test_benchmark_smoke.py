"""The benchmark smoke runner judges scripts whose outcome is known the way it should.

``benchmarks/smoke.py`` runs every benchmark's fast mode in a clone and fails a script that
exits non-zero, runs past its time or writes into the tree. Here it runs on a throw-away
repository of five scripts, one of each kind.
"""

from __future__ import annotations

import importlib
import subprocess
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

_PARSER = """
import argparse, pathlib, sys, time
p = argparse.ArgumentParser()
p.add_argument("--fast", action="store_true")
p.add_argument("--out", default="benchmark_out/x")
a = p.parse_args()
out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
"""

SCRIPTS = {
    # writes its page where it is told: the only good one
    "ok": _PARSER + "(out / 'page.md').write_text('# page')\n",
    # exits 1
    "fails": _PARSER + "sys.exit('no such dataset')\n",
    # writes a page into the repository, as a plain --fast of two scripts once did
    "litters": _PARSER
    + "pathlib.Path('docs').mkdir(); pathlib.Path('docs/p.md').write_text('x')\n",
    # runs past the timeout
    "hangs": _PARSER + "time.sleep(60)\n",
    # no --fast: listed, not run
    "no_fast": "import argparse\nargparse.ArgumentParser().parse_args()\n",
    # changes a committed file
    "edits": _PARSER + "pathlib.Path('benchmarks/ok.py').write_text('')\n",
}


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("smoke")


@pytest.fixture
def project(tmp_path) -> Path:
    repo = tmp_path / "proj"
    (repo / "benchmarks").mkdir(parents=True)
    for name, source in SCRIPTS.items():
        (repo / "benchmarks" / f"{name}.py").write_text(textwrap.dedent(source))
    (repo / ".gitignore").write_text("benchmark_out/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "scripts"], cwd=repo, check=True)
    return repo


def test_each_kind_of_script_is_judged_as_it_should(smoke, project, tmp_path, capsys):
    rc = smoke.main(["--repo", str(project), "--timeout", "8", "--keep", str(tmp_path / "logs")])
    printed = capsys.readouterr().out
    assert rc == 1  # some scripts failed
    table = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in printed.splitlines()
        if line.startswith("| ") and not line.startswith("| script")
    }
    assert table == {
        "ok": "ok",
        "fails": "FAILS",
        "litters": "WRITES INTO THE TREE",
        "hangs": "FAILS",
        "no_fast": "no smoke mode",
        "edits": "WRITES INTO THE TREE",
    }
    assert "docs/p.md" in printed and "benchmarks/ok.py" in printed
    assert "| hangs | FAILS | 124 |" in printed
    assert "no such dataset" in printed  # a failure shows its last line
    # the good script's page went where it was told, outside the clone
    assert (tmp_path / "logs" / "ok" / "out" / "page.md").read_text() == "# page"
    # the clone is reset between scripts: "edits" (run first, in name order) emptied ok.py,
    # and "ok" still ran as committed; the repository itself is untouched
    assert (project / "benchmarks" / "ok.py").read_text() == textwrap.dedent(SCRIPTS["ok"])
    assert "5 of 6 ok" not in printed and "2 of 6 ok" in printed


def test_only_good_scripts_pass(smoke, project):
    assert smoke.main(["--repo", str(project), "--only", "ok,no_fast"]) == 0


def test_unknown_script_names_are_refused(smoke, project):
    with pytest.raises(SystemExit, match="No benchmark script"):
        smoke.main(["--repo", str(project), "--only", "quality"])


def test_the_runner_finds_this_repositorys_benchmarks(smoke):
    names = smoke.scripts(BENCHMARKS.parent)
    assert {"quality", "augmentation", "split_seeds"} <= set(names) and "smoke" not in names
