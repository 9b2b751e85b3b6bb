"""API tier: the platform loads, declares a compatible API range, and answers every contract method
with the right types, before and after device initialisation."""
import time

import torch

from plugserve_plugin_api import (
    AttentionBackend, ConfigError, Detection, MemoryInfo, Ops, PlatformConfig, check_api_compatible,
)
from plugserve_conformance.cases import Case, check

# detect() runs for every installed platform on every engine start and may not touch the
# device; a probe that takes longer than this is almost certainly initialising a runtime.
DETECT_BUDGET_S = 2.0
# memory_info: free and total are read at different instants on some runtimes.
MEMORY_TOLERANCE = 0.01


def _class_attributes(t):
    cls = t.cls
    for attr, kind in (("name", str), ("api_requires", str), ("device_type", str), ("default_block_size", int)):
        value = getattr(cls, attr, None)
        check(isinstance(value, kind), f"{attr} must be a {kind.__name__}, got {value!r}")
    dtypes = cls.supported_dtypes
    check(isinstance(dtypes, tuple) and dtypes and all(isinstance(d, torch.dtype) for d in dtypes),
          f"supported_dtypes must be a non-empty tuple of torch.dtype, got {dtypes!r}")
    check(cls.default_dtype in dtypes, f"default_dtype {cls.default_dtype} is not in supported_dtypes")
    bs = cls.default_block_size
    check(bs > 0 and bs & (bs - 1) == 0, f"default_block_size must be a power of two, got {bs}")


def _api_range(t):
    reason = check_api_compatible(t.package, t.cls.api_requires)
    check(reason is None, reason or "")


def _detect(t):
    start = time.perf_counter()
    d = t.cls.detect()
    took = time.perf_counter() - start
    check(isinstance(d, Detection), f"detect() returned {type(d).__name__}, not Detection")
    check(isinstance(d.usable, bool) and isinstance(d.priority, int) and isinstance(d.reason, str),
          f"Detection fields have wrong types: {d!r}")
    check(d.usable, f"detect() says unusable here: {d.reason}")
    check(took < DETECT_BUDGET_S,
          f"detect() took {took:.2f} s (budget {DETECT_BUDGET_S} s): is it initialising the device?")
    return {"detect_seconds": took}


def _init_device(t):
    device = t.device
    check(isinstance(device, torch.device), f"init_device() returned {type(device).__name__}")
    check(device.type == t.cls.device_type,
          f"init_device() gave a {device.type} device, device_type is {t.cls.device_type}")
    torch.zeros(4, device=device).add_(1)  # the device takes work


def _describe_device(t):
    text = t.platform.describe_device()
    check(isinstance(text, str) and text.strip() and "\n" not in text.strip(),
          f"describe_device() must be one non-empty line, got {text!r}")


def _memory_info(t):
    t.device
    m = t.platform.memory_info()
    check(isinstance(m, MemoryInfo), f"memory_info() returned {type(m).__name__}")
    check(all(isinstance(v, int) for v in (m.total, m.free, m.used)), f"memory_info fields must be int bytes: {m!r}")
    check(0 < m.free <= m.total, f"memory_info must have 0 < free <= total, got free={m.free} total={m.total}")
    check(abs(m.used - (m.total - m.free)) <= MEMORY_TOLERANCE * m.total,
          f"memory_info used={m.used} is not total - free = {m.total - m.free}")


def _validate_config(t):
    p = t.platform
    cfg = p.validate_config(PlatformConfig())
    check(isinstance(cfg, PlatformConfig), f"validate_config returned {type(cfg).__name__}")
    check(cfg.dtype in t.cls.supported_dtypes, f"default config dtype {cfg.dtype} is not supported")
    check(isinstance(cfg.block_size, int) and cfg.block_size > 0, f"default block size {cfg.block_size!r}")
    for dtype in t.cls.supported_dtypes:
        check(p.validate_config(PlatformConfig(dtype=dtype)).dtype == dtype, f"validate_config changed dtype {dtype}")
    unsupported = [d for d in (torch.float32, torch.bfloat16, torch.float16) if d not in t.cls.supported_dtypes]
    for dtype in unsupported:
        try:
            p.validate_config(PlatformConfig(dtype=dtype))
        except ConfigError:
            continue
        check(False, f"validate_config accepted unsupported dtype {dtype} instead of raising ConfigError")


def _attention_backends(t):
    check(isinstance(t.backends, list) and t.backends, "attention_backends() must be a non-empty list")
    for b in t.backends:
        check(isinstance(b, type) and issubclass(b, AttentionBackend), f"{b!r} is not an AttentionBackend subclass")
        check(isinstance(getattr(b, "name", None), str), f"{b!r} has no name")


def _ops(t):
    ops = t.platform.ops()
    check(isinstance(ops, Ops), f"ops() returned {type(ops).__name__}, not Ops")
    for name in Ops.__dataclass_fields__:
        check(callable(getattr(ops, name)), f"ops().{name} is not callable")


def _misc(t):
    t.platform.synchronize()
    t.platform.seed(0)
    caps = t.platform.capabilities()
    check(isinstance(caps, dict), f"capabilities() returned {type(caps).__name__}, not dict")


CHECKS = {
    "class-attributes": _class_attributes, "api-range": _api_range, "detect": _detect,
    "describe-device": _describe_device, "init-device": _init_device, "memory-info": _memory_info,
    "validate-config": _validate_config, "attention-backends": _attention_backends, "ops-table": _ops,
    "synchronize-seed-capabilities": _misc,
}


def cases(target, sweep: str) -> list[Case]:
    return [Case(f"api/{name}", "api", fn) for name, fn in CHECKS.items()]
