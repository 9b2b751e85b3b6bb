"""plugserve's platform conformance suite (ARCHITECTURE.md section 5).

    from plugserve_conformance import run
    report = run("cpu", tiers=("api", "ops"))
    assert report.ok, [r.id for r in report.failed]
"""
SUITE_VERSION = "0.1.0"

from plugserve_conformance.runner import Report, run  # noqa: E402  (runner imports SUITE_VERSION)

__all__ = ["SUITE_VERSION", "Report", "run"]
