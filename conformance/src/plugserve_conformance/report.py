"""Reports: JSON (the machine-readable record, input of the support matrix) and JUnit XML (for CI UIs)."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from plugserve_conformance.cases import FAILED, UNSUPPORTED, XFAIL, XPASS, Result
from plugserve_conformance.runner import Report

FORMAT_VERSION = 1


def to_json(report: Report) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "platform": report.platform, "package": report.package, "package_version": report.package_version,
        "api_version": report.api_version, "device": report.device, "suite_version": report.suite_version,
        "tiers": report.tiers, "sweep": report.sweep, "seconds": round(report.seconds, 3),
        "counts": report.counts(), "results": [r.to_json() for r in report.results],
    }


def write_json(report: Report, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_json(report), indent=1) + "\n")


def load_json(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: report format {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    return data


def to_junit(report: Report) -> ET.Element:
    counts = report.counts()
    suite = ET.Element("testsuite", name=f"plugserve-conformance.{report.platform}", tests=str(len(report.results)),
                       failures=str(counts[FAILED]), errors="0",
                       skipped=str(counts[UNSUPPORTED] + counts[XFAIL]), time=f"{report.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for key in ("platform", "package", "package_version", "api_version", "device", "suite_version", "sweep"):
        ET.SubElement(props, "property", name=key, value=str(getattr(report, key)))
    for r in report.results:
        suite.append(_testcase(r))
    return suite


def _testcase(r: Result) -> ET.Element:
    classname, _, name = r.id.rpartition("/")
    case = ET.Element("testcase", classname=classname.replace("/", "."), name=name, time=f"{r.seconds:.6f}")
    if r.status == FAILED:
        ET.SubElement(case, "failure", message=(r.error or "").splitlines()[0] if r.error else "failed").text = r.error
    elif r.status in (UNSUPPORTED, XFAIL):
        ET.SubElement(case, "skipped", message=f"{r.status} ({r.reason}): {r.error or ''}".strip())
    elif r.status == XPASS:
        ET.SubElement(case, "system-out").text = f"xpass: expected to fail ({r.reason}) but passed"
    return case


def write_junit(report: Report, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tree = ET.ElementTree(to_junit(report))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
