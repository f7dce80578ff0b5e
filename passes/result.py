"""What a pass did: one decision per node it looked at, so the report states what the code did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Decision", "PassResult"]


@dataclass(frozen=True)
class Decision:
    """One node's outcome in a pass: ``action`` is what happened, ``reason`` why (or why not)."""

    node: str
    op: str
    action: str
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    name: str
    decisions: list[Decision] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # totals the pass changed (e.g. weight elements)

    def record(self, node: str, op: str, action: str, reason: str = "", **details: Any) -> None:
        self.decisions.append(Decision(node, op, action, reason, details))

    def with_action(self, action: str) -> list[Decision]:
        return [d for d in self.decisions if d.action == action]

    @property
    def modified(self) -> bool:
        return any(d.action != "skipped" for d in self.decisions)
