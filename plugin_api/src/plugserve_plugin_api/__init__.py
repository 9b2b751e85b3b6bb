"""plugserve plugin API: what a platform package implements and the core calls.

A platform is a subclass of :class:`Platform`, registered through the
``register_platforms`` hook from a module named by an entry point in the
``plugserve.platforms`` group.
"""
from plugserve_plugin_api.attention import AttentionBackend, AttentionBatch, AttentionSpec, ReferenceAttention
from plugserve_plugin_api.hookspecs import hookimpl, hookspec, PROJECT
from plugserve_plugin_api.ops import Ops, REFERENCE_OPS
from plugserve_plugin_api.platform import ConfigError, Detection, MemoryInfo, Platform, PlatformConfig
from plugserve_plugin_api.quant import GroupQuantWeight, Linear, ReferenceLinear
from plugserve_plugin_api.version import API_VERSION, check_api_compatible

__all__ = [
    "API_VERSION", "PROJECT", "AttentionBackend", "AttentionBatch", "AttentionSpec", "ConfigError",
    "Detection", "GroupQuantWeight", "Linear", "MemoryInfo", "Ops", "Platform", "PlatformConfig",
    "REFERENCE_OPS", "ReferenceAttention", "ReferenceLinear", "check_api_compatible", "hookimpl", "hookspec",
]
