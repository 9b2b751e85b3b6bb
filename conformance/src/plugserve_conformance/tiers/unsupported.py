"""Tiers the plugin API has no capability for yet (ARCHITECTURE.md section 5 lists them).

They are reported as unsupported with reason "no-capability" rather than tested through
invented API; when the API grows a graph-capture or communicator contract, these become
real tiers.
"""
from plugserve_conformance.cases import Case, Unsupported

_PLANNED = {
    "graph": ("capture-replay-equals-eager", "padded-batch-replay"),
    "communicator": ("all-reduce", "all-gather", "multi-process-init"),
}


def _no_capability(tier):
    def run(t):
        raise Unsupported(f"the plugin API {tier!r} capability does not exist yet", code="no-capability")
    return run


def cases_for(tier: str):
    def cases(target, sweep: str) -> list[Case]:
        return [Case(f"{tier}/{name}", tier, _no_capability(tier)) for name in _PLANNED[tier]]
    return cases
