"""One time-boxed part of the device check: its record, its budget, and failure isolation between its items."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional


class BudgetExhausted(Exception):
    """Raised by Part.check_budget when the part's wall-clock budget is spent."""


@dataclass
class Part:
    """One part's record: rows of measurements, checks against targets, notes, and how it ended."""
    name: str
    budget_s: float
    protocol: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    error: str = ""
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.budget_s

    def check_budget(self, next_item: str) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExhausted(next_item)

    def item(self, what: str, fn: Callable[[], Optional[dict]]) -> Optional[dict]:
        """Run one item: out of budget -> listed as skipped; an exception -> an error row; else its row."""
        try:
            self.check_budget(what)
            row = fn()
        except BudgetExhausted:
            self.skipped.append(what)
            return None
        except Exception as exc:  # noqa: BLE001  (one failing item must not stop the check)
            row = {"item": what, "error": f"{type(exc).__name__}: {exc}"}
        if row is not None:
            self.rows.append(row)
            if "error" in row:
                self.status = "failed"
        return row

    def check(self, name: str, value: Optional[float], target: str, met: Optional[bool]) -> None:
        self.checks.append({"check": name, "value": value, "target": target, "met": met})

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "started"}
        if self.skipped:
            data["status"] = "partial" if self.status == "ok" else self.status
            data["reason"] = f"budget of {self.budget_s:.0f} s spent; not run: {', '.join(self.skipped)}"
        return data


def run_part(name: str, budget_s: float, body: Callable[[Part], None]) -> dict:
    """Run one part; an exception escaping `body` is recorded as its error (type and message)."""
    part = Part(name, budget_s)
    try:
        body(part)
    except Exception as exc:  # noqa: BLE001
        part.status, part.error = "failed", f"{type(exc).__name__}: {exc}"
    part.seconds = time.monotonic() - part.started
    if part.status == "failed" and not part.error:
        part.error = "; ".join(row["error"] for row in part.rows if "error" in row)
    return part.to_dict()


def skip_part(name: str, reason: str) -> dict:
    return {"name": name, "status": "skipped", "reason": reason, "rows": [], "checks": [], "notes": [],
            "protocol": [], "skipped": [], "error": "", "seconds": 0.0, "budget_s": 0.0}
