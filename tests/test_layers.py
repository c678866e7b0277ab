"""The package's layers hold by construction: import-linter's contract in pyproject.toml (arrows point down,
the four tools in the middle independent) and no import cycle between any two modules."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_layer_contract_is_kept():
    res = _lint(REPO, REPO / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The same contract on a copy of the package where the engines import a tool above them fails."""
    shutil.copytree(REPO / "src" / "cpubone", tmp_path / "cpubone", ignore=shutil.ignore_patterns("__pycache__"))
    timing = tmp_path / "cpubone" / "engines" / "timing.py"
    timing.write_text(timing.read_text() + "\n\ndef _up():\n    from ..analysis import bench  # noqa: F401\n")
    res = _lint(REPO, tmp_path)
    assert res.returncode != 0 and "cpubone.engines.timing -> cpubone.analysis.bench" in res.stdout


def _cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan), each a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("cpubone", cache_dir=None)
    assert len(graph.modules) > 50
    # the package faces (__init__) only hand names on; a cycle through one is still a cycle
    assert _cycles(graph) == []
