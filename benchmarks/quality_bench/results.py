# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The results table: a ``Row`` per model (a perplexity, or with ``skipped`` the reason there is none) and
``Results``, the rows so far, which logs each row as it comes, rewrites ``--table`` after each one and renders the
markdown table (perplexity against the GPTQ base, the share of the fine-tune's gain a merged or exported row keeps,
the context lines and the wall time with the command).
"""

from __future__ import annotations

import argparse
import math
import shlex
import time
from dataclasses import dataclass, field

from .common import logger


@dataclass
class Row:
    """One line of the table: a perplexity, or the reason there is none."""

    bits: int | None
    key: str
    label: str
    perplexity: float | None = None
    note: str = ""
    trained: str | None = None  # key of the unmerged row this one merges or exports: the note says what it keeps


@dataclass
class Results:
    """The rows so far; the table is rewritten after each one, so an interrupted run still leaves its results."""

    args: argparse.Namespace
    argv: list[str]
    started: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    context: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        shown = f"{row.perplexity:.2f}" if row.perplexity is not None else "-"
        logger.info("ROW %s-bit %s: perplexity %s %s", row.bits or "fp32", row.key, shown, row.note)
        if self.args.table:
            self.args.table.parent.mkdir(parents=True, exist_ok=True)
            self.args.table.write_text(self.render() + "\n", encoding="utf-8")

    def perplexity(self, bits: int | None, key: str) -> float | None:
        return next((r.perplexity for r in self.rows if r.bits == bits and r.key == key), None)

    def kept(self, row: Row) -> str:
        """Share of the fine-tune's gain (in held-out loss over the GPTQ base) that a merged or exported row keeps."""
        base, trained = self.perplexity(row.bits, "gptq"), self.perplexity(row.bits, row.trained or "")
        if row.perplexity is None or base is None or trained is None or not trained < base:
            return ""
        share = (math.log(base) - math.log(row.perplexity)) / (math.log(base) - math.log(trained))
        return f"keeps {share:.0%} of the gain; "

    def render(self) -> str:
        lines = [
            "| bits | model | held-out perplexity | vs GPTQ base | notes |",
            "|---|---|---|---|---|",
        ]
        for row in self.rows:
            base = self.perplexity(row.bits, "gptq")
            if row.perplexity is None:
                value, change = "—", "—"
            else:
                value = f"{row.perplexity:.2f}"
                change = "—" if base is None or row.key == "gptq" else f"{row.perplexity / base - 1:+.1%}"
            note = (self.kept(row) + row.note).removesuffix("; ")
            lines.append(f"| {row.bits or 'fp32'} | {row.label} | {value} | {change} | {note} |")
        elapsed = time.perf_counter() - self.started
        command = shlex.join(["TORCHDYNAMO_DISABLE=1", "python", "benchmarks/quality.py", *self.argv])
        lines += ["", *self.context, f"Wall time: {elapsed / 60:.1f} min. Command: `{command}`"]
        return "\n".join(lines)


def skipped(bits: int, key: str, label: str, reason: str) -> Row:
    return Row(bits, key, label, None, f"skipped: {reason}")
