"""``Did you mean ...?`` for names the user mistyped (config keys, methods, models, datasets)."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """`` Did you mean 'x'?`` (leading space) or an empty string when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=n)
    if not close:
        return ""
    return " Did you mean " + ", ".join(f"'{c}'" for c in close) + "?"
