"""Opt-in pytest plugin: `pytest -p plugserve_conformance.pytest_plugin --conformance-platform NAME`.

Turns each conformance case into a pytest test (id = case id), so vendors can use pytest's
own selection, reporting and xdist. Not registered under "pytest11": it would load torch and
every platform plugin in every pytest session of the environment.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("plugserve-conformance")
    group.addoption("--conformance-platform", help="run the conformance suite on this platform")
    group.addoption("--conformance-tiers", default="api,ops,attention", help="comma-separated tiers")
    group.addoption("--conformance-sweep", default="quick", choices=["quick", "full"])
    group.addoption("--conformance-expectations", help="expectations TOML file")


def pytest_collection_modifyitems(session, config, items):
    name = config.getoption("--conformance-platform")
    if not name:
        return
    from plugserve_conformance import expectations
    from plugserve_conformance.runner import select_cases
    from plugserve_conformance.target import resolve

    target = resolve(name)
    exp = expectations.load(config.getoption("--conformance-expectations"))
    tiers = tuple(config.getoption("--conformance-tiers").split(","))
    for case in select_cases(target, tiers, sweep=config.getoption("--conformance-sweep"), expectations=exp):
        items.append(ConformanceItem.from_parent(session, name=case.id, case=case, target=target, exp=exp))


class ConformanceItem(pytest.Item):
    def __init__(self, *, case, target, exp, **kwargs):
        super().__init__(**kwargs)
        self.case, self.target, self.exp = case, target, exp

    def runtest(self):
        from plugserve_conformance.runner import run_case

        result = run_case(self.case, self.target, self.exp)
        if result.status in ("unsupported", "xfail"):
            pytest.skip(f"{result.status} ({result.reason}): {result.error or ''}")
        if result.status == "failed":
            raise AssertionError(result.error)

    def reportinfo(self):
        return "plugserve-conformance", None, self.case.id
