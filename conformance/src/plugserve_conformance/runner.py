"""Collects the cases of the chosen tiers, runs them one by one, and classifies each result."""
import fnmatch
import time
import traceback
from dataclasses import dataclass, field

from plugserve_conformance import SUITE_VERSION
from plugserve_conformance.cases import (
    DEFAULT_TIERS, FAILED, PASSED, TIERS, UNSUPPORTED, XFAIL, XPASS, Case, CaseFailure, Result, Unsupported,
)
from plugserve_conformance.expectations import Expectations
from plugserve_conformance.target import PlatformUnderTest, resolve
from plugserve_conformance.tiers import api, attention, e2e, ops, perf
from plugserve_conformance.tiers.unsupported import cases_for

GENERATORS = {"api": api.cases, "ops": ops.cases, "attention": attention.cases, "e2e": e2e.cases,
              "perf": perf.cases, "graph": cases_for("graph"), "communicator": cases_for("communicator")}


@dataclass
class Report:
    platform: str
    package: str
    package_version: str
    api_version: str
    device: str
    suite_version: str
    tiers: list[str]
    sweep: str
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (PASSED, FAILED, UNSUPPORTED, XFAIL, XPASS)}
        for r in self.results:
            out[r.status] += 1
        return out

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed


def select_cases(target: PlatformUnderTest, tiers=DEFAULT_TIERS, pattern: str | None = None,
                 sweep: str = "full", expectations: Expectations | None = None) -> list[Case]:
    expectations = expectations or Expectations()
    unknown = set(tiers) - set(TIERS)
    if unknown:
        raise ValueError(f"unknown tiers {sorted(unknown)}; choose from {', '.join(TIERS)}")
    chosen = []
    for tier in TIERS:  # always in the canonical order: api before anything that initialises the device
        if tier in tiers:
            chosen += [c for c in GENERATORS[tier](target, sweep)
                       if _matches(c.id, pattern) and expectations.included(c.id)]
    return chosen


def _matches(case_id: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(case_id, pattern)
    return pattern in case_id


def run_case(case: Case, target: PlatformUnderTest, expectations: Expectations) -> Result:
    excluded = expectations.excluded(case.id)
    if excluded:
        return Result(case.id, case.tier, UNSUPPORTED, 0.0, error=excluded.note or None, reason=excluded.reason)
    start = time.perf_counter()
    metrics, error, status, reason = {}, None, PASSED, None
    try:
        metrics = case.run(target) or {}
    except Unsupported as exc:
        status, error, reason = UNSUPPORTED, str(exc), exc.code
    except CaseFailure as exc:
        status, error = FAILED, str(exc)
    except Exception as exc:  # a crash in the platform is a failure of this case, not of the run
        status = FAILED
        error = f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc)[-3:])}".strip()
    seconds = time.perf_counter() - start
    expected = expectations.expected_to_fail(case.id)
    if expected and status == FAILED:
        status, reason = XFAIL, expected.reason
    elif expected and status == PASSED:
        status, reason = XPASS, expected.reason
    return Result(case.id, case.tier, status, seconds, error, reason, metrics)


def run(platform, tiers=DEFAULT_TIERS, pattern: str | None = None, sweep: str = "full",
        expectations: Expectations | None = None, progress=None) -> Report:
    """Run the suite. ``platform``: a registered name, a Platform subclass, or an instance."""
    from plugserve_plugin_api import API_VERSION

    expectations = expectations or Expectations()
    target = resolve(platform)
    report = Report(target.name, target.package, target.package_version, API_VERSION, "", SUITE_VERSION,
                    [t for t in TIERS if t in tiers], sweep)
    start = time.perf_counter()
    for case in select_cases(target, tiers, pattern, sweep, expectations):
        result = run_case(case, target, expectations)
        report.results.append(result)
        if progress:
            progress(result)
    report.device = target.describe()  # after the run: describing may need the initialised device
    report.seconds = time.perf_counter() - start
    return report
