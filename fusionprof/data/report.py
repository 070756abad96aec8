"""Counting what the data path skipped or repaired, so nothing is dropped silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES = 3


@dataclass
class DataReport:
    """Per split: entries skipped (by reason) and images repaired on load (by kind)."""

    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, where)

    def convert(self, kind: str, where: str) -> None:
        self.converted[kind] += 1
        self._example(kind, where)

    def _example(self, key: str, where: str) -> None:
        examples = self.examples.setdefault(key, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def merge(self, other: DataReport) -> None:
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        for key, where in other.examples.items():
            for w in where:
                self._example(key, w)

    def to_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "converted": dict(self.converted), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> DataReport:
        return cls(Counter(d.get("skipped", {})), Counter(d.get("converted", {})), dict(d.get("examples", {})))

    def lines(self, split: str) -> list[str]:
        """Human-readable lines for the console; empty when there was nothing to report."""
        out = []
        for title, counts in (("skipped", self.skipped), ("converted to RGB", self.converted)):
            for key, n in sorted(counts.items()):
                eg = ", ".join(self.examples.get(key, []))
                out.append(f"[{split}] {title}: {n} × {key.replace('_', ' ')} (e.g. {eg})")
        return out
