"""Fenced code blocks in model text (Markdown's ```` ``` ```` blocks), read the same way by the
``markdown`` tool-call parser (``rollout/parsers.py``) and by the coding env's single-turn code
mode (``envs/coding.py``), which is why it lives on the ground floor both stand on.

A block opens with a line of three or more backticks (or tildes) followed by an optional info
string (```` ```python solution.py ````) and closes with a line of at least as many of the same
character and nothing else. As in CommonMark, a backtick opening line whose info string holds
a backtick is not a fence (```` ```ls``` ```` is inline code), and the opening line's
indentation is removed from the block's lines (a fence inside a list item still yields code
that starts at column 0). Unlike CommonMark, a fence may be indented by any number of spaces:
small models indent them freely. A block still open when the text ends is returned with
``closed=False``; what that means is the caller's choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPEN = re.compile(r"^( *)(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Fence:
    """One fenced block.

    info: the info string after the opening fence, stripped (``"python solution.py"``).
    body: the lines between the fences, indentation of the opening fence removed, each ending
        with a newline ("" for an empty block).
    closed: False if the text ended inside the block (generation cut, or the closing fence
        never written).
    raw: the block exactly as written, fences included.
    """

    info: str
    body: str
    closed: bool
    raw: str

    @property
    def language(self) -> str:
        """The info string's first word, lowercased ("" if none)."""
        words = self.info.split()
        return words[0].lower() if words else ""


def fenced_blocks(text: str) -> list[Fence]:
    """Every fenced block of ``text``, in order; text outside blocks is ignored."""
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    blocks: list[Fence] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i].rstrip("\r"))
        if m is None or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        close = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}} *$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and close.match(lines[j].rstrip("\r")) is None:
            line = lines[j].rstrip("\r")
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            j += 1
        closed = j < len(lines)
        if not closed and body and body[-1] == "":
            body.pop()  # the text's final newline, not an empty last line of the block
        end = starts[j + 1] - 1 if closed else len(text)
        blocks.append(Fence(info, "".join(b + "\n" for b in body), closed, text[starts[i]:end]))
        i = j + 1
    return blocks
