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
