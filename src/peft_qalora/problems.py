# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""How an error lists what is wrong: one problem a line, the first few only."""

from __future__ import annotations

MAX_LISTED = 8


def format_problems(problems: list[str]) -> str:
    """``problems`` as indented lines to append to an error message, at most :data:`MAX_LISTED` of them."""
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"
