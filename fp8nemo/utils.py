"""Small helpers the CLI-facing modules share."""

from __future__ import annotations

from collections.abc import Iterable


def progress(items: Iterable, desc: str, unit: str, enabled: bool = True) -> Iterable:
    """`items` with a tqdm progress bar when tqdm is installed (the bench extra) and enabled."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit)


def text_table(rows: Iterable[Iterable[object]], align: str = "left") -> list[str]:
    """Rows of cells (the first row the heading) as lines of columns two spaces apart, each
    column as wide as its widest cell: all left-aligned ("left"), all right-aligned ("right"),
    or the first left and the rest right ("label", a row label before numbers)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(i: int, text: str, width: int) -> str:
        left = align == "left" or (align == "label" and i == 0)
        return text.ljust(width) if left else text.rjust(width)

    return [
        "  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    ]
