"""The platform under test, found by name through the plugin registry or handed in directly.

Handing in a class or instance is for the suite's own tests (planted bugs) and for
vendors iterating on a platform before packaging it. The end-to-end tier drives the
engine, which finds platforms only through entry points; for a platform handed in
directly, ``visible_to_engine`` publishes it through a temporary dist-info folder on
sys.path, so the engine loads it by the ordinary route.
"""
import contextlib
import importlib.metadata as md
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plugserve_plugin_api import Platform
from plugserve_plugin_api.version import ENTRY_POINT_GROUP_PLATFORMS


@dataclass
class PlatformUnderTest:
    platform: Platform
    package: str
    package_version: str
    backends: list            # attention backend classes, plugin-offered ones first
    from_registry: bool
    _device: torch.device | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.platform.name

    @property
    def cls(self) -> type[Platform]:
        return type(self.platform)

    @property
    def device(self) -> torch.device:
        """Initialised once, on first use: the api tier checks detection before any device exists."""
        if self._device is None:
            self._device = self.platform.init_device(0)
        return self._device

    def describe(self) -> str:
        try:
            return self.platform.describe_device()
        except Exception as exc:  # reported, and the api tier fails it
            return f"<describe_device raised {type(exc).__name__}: {exc}>"


def resolve(platform: "str | Platform | type[Platform]") -> PlatformUnderTest:
    if isinstance(platform, str):
        from plugserve.platforms import load_registry

        registry = load_registry()
        info = registry.info_for(platform)
        instance = info.cls()
        return PlatformUnderTest(instance, info.package, info.package_version,
                                 registry.attention_backends(instance), True)
    instance = platform() if isinstance(platform, type) else platform
    package, version = _distribution_of(type(instance))
    return PlatformUnderTest(instance, package, version, list(instance.attention_backends()), False)


def _distribution_of(cls: type) -> tuple[str, str]:
    top = cls.__module__.split(".")[0]
    for dist in md.packages_distributions().get(top, []):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            pass
    return f"<module {cls.__module__}>", "0+local"


# Platforms published by visible_to_engine, read by the temporary entry point's module.
_PUBLISHED: list[type[Platform]] = []


@contextlib.contextmanager
def visible_to_engine(target: PlatformUnderTest):
    """Make ``target`` loadable by name through entry points for the duration of the block."""
    if target.from_registry:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="plugserve-conformance-") as tmp:
        dist = Path(tmp) / f"plugserve_conformance_inprocess_{target.name.replace('-', '_')}-0+local.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plugserve-conformance-inprocess-{target.name}\n"
                                       "Version: 0+local\n")
        (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP_PLATFORMS}]\n"
                                               f"{target.name} = plugserve_conformance._inprocess\n")
        _PUBLISHED.append(target.cls)
        sys.path.append(tmp)
        try:
            yield
        finally:
            sys.path.remove(tmp)
            _PUBLISHED.remove(target.cls)

