"""The documentation: the site builds in strict mode (a broken link, a missing heading or a reference to a
missing object fails, as in CI), the API reference is generated, and README.md stays the repository's short
front door: the two commands first, at most 12 KB, every relative link pointing to a file that exists."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

TWO_COMMANDS = """# cpubone

```bash
make bench   # main job: batch-1 CPU latency of CPUBone vs peer backbones (sets up .venv on first run)
make test    # the test suite (sets up .venv on first run)
```
"""

# [text](target) and ![alt](target), with an optional "title"; reference definitions [x]: target
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)


def _strip_fences(markdown: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", markdown, flags=re.MULTILINE | re.DOTALL)


def _prose(markdown: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", _strip_fences(markdown), flags=re.DOTALL)


def _github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading (the docs site uses the same: mkdocs.yml, toc slugify)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _strip_fences(path.read_text(encoding="utf-8")),
                          re.MULTILINE)
    return {_github_anchor(h) for h in headings}


def readme_links() -> list:
    text = _prose(README.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def test_docs_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'cpubone[docs]')")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    # the API reference is generated from the docstrings: the page documenting the timing module lists the
    # one timing loop
    pages = [p for p in (site / "api").rglob("*.html") if 'id="cpubone.engines.timing"' in p.read_text("utf-8")]
    assert pages, "no API page documents cpubone.engines.timing"
    assert any('id="cpubone.engines.timing.time_interleaved"' in p.read_text("utf-8") for p in pages)
    assert (site / "index.html").is_file()


def test_readme_starts_with_the_two_commands_and_is_short():
    text = README.read_text(encoding="utf-8")
    assert text.startswith(TWO_COMMANDS), "README.md must open with the two commands block"
    assert len(README.read_bytes()) <= 12 * 1024, f"README.md is {len(README.read_bytes())} bytes; keep it <= 12 KB"


def test_readme_relative_links_point_to_existing_files():
    links = readme_links()
    assert links, "no links found in README.md"
    broken = []
    for target in links:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (README.parent / path).resolve() if path else README
        if not dest.is_relative_to(REPO) or not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)


def test_link_parsing_finds_what_it_should():
    text = _prose("See [a](docs/a.md#x), ![pic](docs/p.png \"t\") and `[not](a link)`.\n\n"
                  "```bash\n[no](link)\n```\n[ref]: docs/b.md\n")
    assert INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text) == ["docs/a.md#x", "docs/p.png", "docs/b.md"]
    assert _github_anchor("Mobile: TFLite / LiteRT (optional extra `[mobile]`)") == \
        "mobile-tflite--litert-optional-extra-mobile"
