"""Finding plugins and choosing the platform (ARCHITECTURE.md, rule 6).

Plugins come from two entry-point groups: ``plugserve.platforms`` (platform
packages) and ``plugserve.plugins`` (models, extra attention backends). A plugin
that fails to import or to answer is recorded and does not stop the others.
"""
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from plugserve_plugin_api import PROJECT, Detection, Platform, check_api_compatible, hookspecs
from plugserve_plugin_api.version import API_VERSION, ENTRY_POINT_GROUP_PLATFORMS, ENTRY_POINT_GROUP_PLUGINS


class PlatformError(RuntimeError):
    """No platform can be chosen; the message says what to do."""


@dataclass
class PlatformInfo:
    name: str
    cls: type[Platform]
    package: str
    package_version: str
    api_requires: str
    incompatible: str | None = None   # why the API range excludes us
    detection: Detection | None = None
    detection_error: str | None = None

    @property
    def usable(self) -> bool:
        return self.incompatible is None and self.detection is not None and self.detection.usable

    @property
    def why_unusable(self) -> str:
        if self.incompatible:
            return self.incompatible
        if self.detection_error:
            return f"detection raised: {self.detection_error}"
        return self.detection.reason if self.detection else "not detected"


@dataclass
class PluginFailure:
    entry_point: str
    package: str
    error: str


@dataclass
class Registry:
    plugin_manager: pluggy.PluginManager
    platforms: dict[str, PlatformInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def attention_backends(self, platform: Platform) -> list:
        """Backends offered by plugins for this platform first, then the platform's own, in order."""
        extra = []
        self.plugin_manager.hook.register_attention_backends(platform_name=platform.name, register=extra.append)
        return extra + list(platform.attention_backends())

    def models(self) -> dict[str, type]:
        found: dict[str, type] = {}
        self.plugin_manager.hook.register_models(register=lambda name, cls: found.__setitem__(name, cls))
        return found

    def select(self, name: str | None = None) -> Platform:
        return self.info_for(name).cls()

    def info_for(self, name: str | None = None) -> PlatformInfo:
        name = name or os.environ.get("PLUGSERVE_PLATFORM") or None
        if name:
            return self._named(name)
        usable = sorted((p for p in self.platforms.values() if p.usable),
                        key=lambda p: p.detection.priority, reverse=True)
        if not usable:
            lines = [f"  {p.name}: {p.why_unusable}" for p in self.platforms.values()]
            lines += [f"  {f.entry_point} ({f.package}): failed to load: {f.error}" for f in self.failures]
            raise PlatformError("no usable platform is installed.\n" + "\n".join(lines or ["  (none installed)"]) +
                                "\nInstall one, e.g. `pip install plugserve[cpu]`.")
        if len(usable) > 1 and usable[0].detection.priority == usable[1].detection.priority:
            tied = [p.name for p in usable if p.detection.priority == usable[0].detection.priority]
            raise PlatformError(f"platforms {', '.join(tied)} are all usable with priority "
                                f"{usable[0].detection.priority}; choose one with --platform NAME or PLUGSERVE_PLATFORM")
        return usable[0]

    def _named(self, name: str) -> PlatformInfo:
        info = self.platforms.get(name)
        if info is None:
            installed = ", ".join(sorted(self.platforms)) or "none"
            failed = "".join(f"\n  {f.entry_point} ({f.package}) failed to load: {f.error}" for f in self.failures)
            raise PlatformError(f"unknown platform {name!r}; installed platforms: {installed}{failed}")
        if not info.usable:
            raise PlatformError(f"platform {name!r} ({info.package}) is installed but not usable here: {info.why_unusable}")
        return info


def _allowed(ep: EntryPoint, allowlist: set[str] | None) -> bool:
    if allowlist is None:
        return True
    package = ep.dist.name if ep.dist else ""
    return ep.name in allowlist or package in allowlist


def load_registry() -> Registry:
    """Load every installed plugin (or those in the PLUGSERVE_PLUGINS allowlist) and ask each platform to detect."""
    raw = os.environ.get("PLUGSERVE_PLUGINS")
    allowlist = {s.strip() for s in raw.split(",") if s.strip()} if raw is not None else None
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    for group in (ENTRY_POINT_GROUP_PLATFORMS, ENTRY_POINT_GROUP_PLUGINS):
        for ep in entry_points(group=group):
            if not _allowed(ep, allowlist):
                continue
            package = ep.dist.name if ep.dist else "?"
            try:
                pm.register(ep.load(), name=f"{group}:{ep.name}")
            except Exception as exc:  # a broken plugin must not break the others
                registry.failures.append(PluginFailure(ep.name, package, f"{type(exc).__name__}: {exc}"))
                continue
            if group == ENTRY_POINT_GROUP_PLATFORMS:
                _collect_platforms(registry, pm, ep, package)
    return registry


def _collect_platforms(registry: Registry, pm: pluggy.PluginManager, ep: EntryPoint, package: str) -> None:
    plugin = pm.get_plugin(f"{ENTRY_POINT_GROUP_PLATFORMS}:{ep.name}")
    classes: list[type[Platform]] = []
    try:
        impl = getattr(plugin, "register_platforms")
        impl(register=classes.append)
    except Exception as exc:
        registry.failures.append(PluginFailure(ep.name, package, f"register_platforms raised {type(exc).__name__}: {exc}"))
        return
    version = ep.dist.version if ep.dist else "?"
    for cls in classes:
        requires = getattr(cls, "api_requires", "")
        info = PlatformInfo(cls.name, cls, package, version, requires,
                            incompatible=check_api_compatible(package, requires))
        if info.incompatible is None:
            try:
                info.detection = cls.detect()
            except Exception as exc:
                info.detection_error = f"{type(exc).__name__}: {exc}"
        registry.platforms[cls.name] = info


def describe(registry: Registry) -> dict:
    """What `plugserve platforms --json` prints."""
    out = {"api_version": API_VERSION, "platforms": [], "failed_plugins": [
        {"entry_point": f.entry_point, "package": f.package, "error": f.error} for f in registry.failures]}
    for info in registry.platforms.values():
        entry = {"name": info.name, "package": info.package, "version": info.package_version,
                 "api_requires": info.api_requires, "usable": info.usable,
                 "reason": None if info.usable else info.why_unusable,
                 "priority": info.detection.priority if info.detection else None}
        if info.usable:
            try:
                platform = info.cls()
                entry["device_type"] = platform.device_type
                entry["device"] = platform.describe_device()
                entry["dtypes"] = [str(d).removeprefix("torch.") for d in platform.supported_dtypes]
                entry["attention_backends"] = [b.name for b in registry.attention_backends(platform)]
                entry["capabilities"] = platform.capabilities()
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
        out["platforms"].append(entry)
    return out
