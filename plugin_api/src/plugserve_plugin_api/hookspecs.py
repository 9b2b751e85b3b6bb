"""The hooks a plugin may implement. Each is called by the core; see docs/plugin-api.md."""
import pluggy

PROJECT = "plugserve"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_platforms(register):
    """Register platforms: call ``register(PlatformSubclass)`` once for each platform this package provides."""


@hookspec
def register_attention_backends(platform_name, register):
    """Offer extra attention backends for platform ``platform_name``: call ``register(AttentionBackendSubclass)``.

    They are tried before the platform's own backends, in registration order."""


@hookspec
def register_models(register):
    """Register model architectures: call ``register(architecture_name, model_class)``, where the name is the
    Hugging Face ``architectures`` entry (e.g. ``"LlamaForCausalLM"``)."""
