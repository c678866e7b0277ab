"""Text from files made safe to print (cpubone.text): control characters, bidi overrides, rich markup."""
import io

import pytest
from rich.console import Console
from rich.errors import MarkupError

from cpubone.text import inert, inert_markup


def _render(markup: str) -> str:
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    console.print(markup)
    return console.export_text()


@pytest.mark.parametrize("raw, shown", [
    ("cat\x1b[2J\x1b]0;pwned\x07", "cat\\x1b[2J\\x1b]0;pwned\\x07"),  # clear screen, set title, bell
    ("dog\r\ntop-1 99.99%", "dog\\r\\ntop-1 99.99%"),  # a forged result line
    ("a\tb\x00c\x7fd\x85e\x9bf", "a\\tb\\x00c\\x7fd\\x85e\\x9bf"),  # tab, NUL, DEL, NEL, C1 CSI
    ("\u202egnp.exe", "\\u202egnp.exe"),  # right-to-left override
    ("x\u2066y\u2069z\u202a\u202c", "x\\u2066y\\u2069z\\u202a\\u202c"),  # isolates, embedding, pop
    ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),  # line breaks to str.splitlines
    ("bad\udcff name", "bad\\udcff name"),  # a lone surrogate: printing it raises UnicodeEncodeError
    ("tabby cat, Ünïcödé 猫 🐈", "tabby cat, Ünïcödé 猫 🐈"),  # printable text is untouched
    ("models\\x.onnx", "models\\x.onnx"),  # backslashes too
])
def test_inert_escapes_control_characters(raw, shown):
    out = inert(raw)
    assert out == shown
    assert out.isprintable() and len(out.splitlines()) <= 1
    out.encode("utf-8")  # no lone surrogate left


def test_inert_takes_any_object_and_bytes():
    assert inert(3) == "3" and inert(None) == "None"
    assert inert(b"ok\x1b\xff") == "ok\\x1b\\xff"


def test_inert_truncates_without_splitting_an_escape():
    assert inert("x" * 300) == "x" * 199 + "…" and len(inert("x" * 300)) == 200
    assert inert("x" * 200) == "x" * 200  # exactly fits: no ellipsis
    assert inert("abcdef", max_len=4) == "abc…"
    assert inert("ab\x1bcdef", max_len=5) == "ab…"  # not "ab\\x…"
    assert inert("\x1b" * 3, max_len=9) == "\\x1b\\x1b…"
    assert inert("x" * 300, max_len=None) == "x" * 300
    with pytest.raises(ValueError):
        inert("x", max_len=0)


def test_inert_markup_survives_rich_literally():
    text = _render(f"pip install 'cpubone{inert_markup('[mobile]')}'")
    assert "pip install 'cpubone[mobile]'" in text
    assert "[mobile]" not in _render("pip install 'cpubone[mobile]'")  # what the escape prevents


def test_inert_markup_closing_tag_does_not_raise():
    with pytest.raises(MarkupError):
        _render("class [/] name")  # what the escape prevents
    assert "class [/] name" in _render(f"class {inert_markup('[/]')} name")
    assert "[bold]x[/bold]" in _render(f"[green]{inert_markup('[bold]x[/bold]')}[/green]")
    # a trailing backslash must not escape the markup that follows it
    assert "dir\\ ok" in _render(f"[bold]{inert_markup('dir' + chr(92))}[/bold] ok")


def test_inert_markup_escapes_control_characters_too():
    out = inert_markup("[red]\x1b]0;title\x07\r\n")
    assert "\x1b" not in out and "\r" not in out and "\n" not in out
    assert "\\x1b]0;title\\x07\\r\\n" in _render(out) and "[red]" in _render(out)
