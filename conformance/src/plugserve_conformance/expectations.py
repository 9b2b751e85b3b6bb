"""The expectations file: which cases a platform includes, excludes or expects to fail, and why.

TOML (read with the standard library's tomllib), e.g.::

    [[exclude]]
    id = "attention/*/gqa3-*"
    reason = "unsupported-shape"
    note = "kernel needs a power-of-two GQA ratio"

    [[expected-failure]]
    id = "ops/rms_norm/tiny-*-bf16"
    reason = "known-bug"
    note = "tracked in vendor issue 123"

``include`` entries, when present, restrict the run to matching ids. Ids match as shell globs
(fnmatch). Every entry needs a reason from REASON_CODES, so a report says why, not just what.
"""
import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path

REASON_CODES = ("unsupported-dtype", "unsupported-shape", "known-bug", "not-implemented", "numerical-tolerance")
SECTIONS = ("include", "exclude", "expected-failure")


class ExpectationsError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: str
    reason: str
    note: str = ""

    def matches(self, case_id: str) -> bool:
        return fnmatch.fnmatchcase(case_id, self.pattern)


@dataclass(frozen=True)
class Expectations:
    include: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()
    expected_failure: tuple[Rule, ...] = ()

    def included(self, case_id: str) -> bool:
        return not self.include or any(r.matches(case_id) for r in self.include)

    def excluded(self, case_id: str) -> Rule | None:
        return next((r for r in self.exclude if r.matches(case_id)), None)

    def expected_to_fail(self, case_id: str) -> Rule | None:
        return next((r for r in self.expected_failure if r.matches(case_id)), None)


def load(path: str | Path | None) -> Expectations:
    if path is None:
        return Expectations()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return parse(data, str(path))


def parse(data: dict, source: str = "<expectations>") -> Expectations:
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ExpectationsError(f"{source}: unknown sections {sorted(unknown)}; use {', '.join(SECTIONS)}")
    rules = {}
    for section in SECTIONS:
        entries = data.get(section, [])
        parsed = []
        for i, entry in enumerate(entries):
            where = f"{source}: [[{section}]] #{i + 1}"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise ExpectationsError(f"{where} needs an id glob")
            if entry.get("reason") not in REASON_CODES:
                raise ExpectationsError(f"{where} ({entry['id']}): reason must be one of {', '.join(REASON_CODES)}, "
                                        f"got {entry.get('reason')!r}")
            parsed.append(Rule(entry["id"], entry["reason"], str(entry.get("note", ""))))
        rules[section.replace("-", "_")] = tuple(parsed)
    return Expectations(**rules)
