"""Cases are data: a stable id, a tier and a function; results are what running one produced."""
from dataclasses import dataclass, field
from typing import Any, Callable

# Statuses a case can end in. "unsupported" is not a failure: the platform declared
# (or the expectations file said) it does not run this case.
PASSED, FAILED, UNSUPPORTED, XFAIL, XPASS = "passed", "failed", "unsupported", "xfail", "xpass"
STATUSES = (PASSED, FAILED, UNSUPPORTED, XFAIL, XPASS)

TIERS = ("api", "ops", "attention", "e2e", "perf", "graph", "communicator")
DEFAULT_TIERS = ("api", "ops", "attention", "e2e", "graph", "communicator")  # perf only when asked


class Unsupported(Exception):
    """Raised by a case when the platform declares it cannot run it; the message is the reason."""

    def __init__(self, reason: str, code: str = "unsupported-shape"):
        super().__init__(reason)
        self.code = code


class CaseFailure(AssertionError):
    """A conformance check did not hold; the message says what was expected and what came."""


@dataclass(frozen=True)
class Case:
    id: str                      # e.g. "attention/decode/gqa4-hd128-bs16-ctx1037-fp32"; stable across runs
    tier: str
    run: Callable[[Any], dict | None]   # called with the PlatformUnderTest; may return metrics

    def __repr__(self) -> str:
        return f"Case({self.id})"


@dataclass
class Result:
    id: str
    tier: str
    status: str
    seconds: float
    error: str | None = None
    reason: str | None = None    # reason code for unsupported / xfail / xpass
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"id": self.id, "tier": self.tier, "status": self.status, "seconds": round(self.seconds, 6)}
        for key in ("error", "reason"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.metrics:
            out["metrics"] = self.metrics
        return out


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CaseFailure(message)
