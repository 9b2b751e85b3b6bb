"""The plugin hooks other than platforms: extra attention backends and models reach the engine's choices."""
import pytest

from plugserve.engine import _choose_backend
from plugserve.platforms import load_registry
from plugserve_plugin_api import AttentionSpec, ReferenceAttention, hookimpl

import torch


class PickyAttention(ReferenceAttention):
    name = "picky"

    @classmethod
    def unsupported_reason(cls, spec):
        return None if spec.head_dim == 64 else f"head dim {spec.head_dim} not supported"


class Plugin:
    @hookimpl
    def register_attention_backends(self, platform_name, register):
        if platform_name == "cpu":
            register(PickyAttention)

    @hookimpl
    def register_models(self, register):
        register("MyModelForCausalLM", object)


@pytest.fixture
def registry():
    registry = load_registry()
    registry.plugin_manager.register(Plugin())
    return registry


def test_plugin_backends_come_first_and_are_validated(registry):
    platform = registry.select("cpu")
    backends = registry.attention_backends(platform)
    assert backends[0] is PickyAttention and ReferenceAttention in backends
    spec64 = AttentionSpec(4, 2, 64, torch.float32, 16)
    spec96 = AttentionSpec(4, 2, 96, torch.float32, 16)
    assert isinstance(_choose_backend(backends, spec64, "cpu"), PickyAttention)
    chosen = _choose_backend(backends, spec96, "cpu")
    assert type(chosen) is ReferenceAttention


def test_no_backend_fits_names_every_reason(registry):
    with pytest.raises(ValueError, match="picky: head dim 96 not supported"):
        _choose_backend([PickyAttention], AttentionSpec(4, 2, 96, torch.float32, 16), "cpu")


def test_plugin_models_are_offered(registry):
    assert registry.models() == {"MyModelForCausalLM": object}
