"""Results tables go into README.md from the runs that made them, between markers, never by hand.

A block is ``<!-- NAME: the script that writes it -->`` ... ``<!-- /NAME -->``; :func:`fill` replaces what lies
between the two markers and leaves the rest of the file as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def fill(name: str, text: str, readme: Path = README) -> None:
    """Replace the body of the block ``name`` in ``readme`` by ``text``; a missing marker is an error naming it."""
    doc = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)}(?:: [^>]*)? -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{readme} has no block <!-- {name}: ... --> ... <!-- /{name} --> to put the table in")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text.strip() + "\n" + m.group(2), doc, count=1))
