"""Text that came from a file, made safe to print: ``inert`` for plain output, ``inert_markup`` for rich.

Names printed by the tools are often not ours: class labels in an ONNX file's metadata, a dataset's
classes.json, COCO category names, file names. Printed raw, an ESC sequence in one of them clears the
screen or sets the terminal title, a ``\\r`` or ``\\n`` forges a result line, a bidi override
(U+202E) reverses what follows, and a lone surrogate (an undecodable file name) crashes the print with
``UnicodeEncodeError``. Inside a rich format string, ``[/]`` raises ``MarkupError`` and ``[mobile]``
is taken for a style and vanishes. So every such name goes through one of these two helpers: control
characters become visible escapes (``\\x1b``, ``\\n``, ``\\u202e``) on one line of bounded length, and
``inert_markup`` also escapes rich markup. Backslashes are left as they are (Windows paths stay
readable), so the escapes are for reading, not for decoding back. Importable without torch or rich.
"""
from __future__ import annotations

import unicodedata
from typing import Optional

__all__ = ["inert", "inert_markup"]

# bidi embeddings/overrides/isolates and marks (the "Trojan Source" characters): they reorder what follows
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Cc: C0, DEL and C1 controls (ESC, CSI, NEL); Cs: lone surrogates, which no terminal encoding can print;
# Zl / Zp: U+2028 / U+2029, line breaks to str.splitlines and some terminals
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
ELLIPSIS = "…"


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if ch in _BIDI or unicodedata.category(ch) in _ESCAPED_CATEGORIES:
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def inert(text: object, max_len: Optional[int] = 200) -> str:
    """``text`` as one printable line: control characters as visible escapes, at most ``max_len`` characters.

    ``text`` may be anything (``str()`` is taken; bytes are decoded as UTF-8 with undecodable bytes shown as
    ``\\xNN``). A longer result is cut at ``max_len - 1`` characters plus ``…``, never inside an escape;
    ``max_len=None`` keeps it whole.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="backslashreplace")
    elif not isinstance(text, str):
        text = str(text)
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len={max_len}: expected at least 1 (or None for no limit)")
    pieces: list = []
    length = 0
    for ch in text:
        piece = _escape(ch)
        if max_len is not None and length + len(piece) > max_len:
            # the ellipsis needs one place: drop whole pieces until it fits
            while pieces and length + 1 > max_len:
                length -= len(pieces.pop())
            pieces.append(ELLIPSIS)
            break
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)


def inert_markup(text: object, max_len: Optional[int] = 200) -> str:
    """``inert(text, max_len)`` with rich markup escaped, to place inside a rich format string:
    ``console.print(f"[bold]{inert_markup(name)}[/bold]")`` shows ``name`` literally, brackets included."""
    # here, not at the top: plain-text callers need no rich
    from rich.markup import escape

    return escape(inert(text, max_len))
