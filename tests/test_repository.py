"""The repository stands on its own: no file points outside it (a fresh clone has nothing beside it)."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The team's reference folder beside the checkout, and absolute paths into a particular machine's file system
# (written so that this file does not match itself). Shebangs such as /usr/bin/env are not machine-specific.
FORBIDDEN = re.compile(
    r"\.\./shared"
    r"|shared[/\\]reference"
    r"|(?<![\w.~$-])/(?:work|home|Users|root|tmp|mnt|scratch|data|srv)/"
    r"|(?<![\w])[A-Za-z]:\\\\?[A-Za-z]"
)


def tracked_files() -> list:
    """The files a clone of the repository holds (git ls-files), else every file but caches and virtualenvs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive: no git
        skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_no_file_mentions_paths_outside_the_repository():
    files = tracked_files()
    assert len(files) > 20 and REPO / "README.md" in files
    hits = []
    for path in files:
        if not path.is_file():
            continue  # deleted in the working tree but not yet in git's index
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (arrays, images)
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_should():
    # the examples are split so that this file does not match itself
    for bad in ("see ../" + "shared/x.md", "shared/" + "reference/variants.md", "Path('/wo" + "rk/shared')",
                "--out /t" + "mp/x", "open('/ho" + "me/me/data.json')", "C:" + "\\Users\\me"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("#!/usr/bin/env bash", "~/.cache/cpubone", "tests/data/official/README.md",
                 "$XDG_CACHE_HOME/cpubone", "https://github.com/timm/x", "a/tmp/b", "/dev/null", "timm/cpubone_b0"):
        assert not FORBIDDEN.search(fine), fine
