"""Every hook is documented with its exact signature (as datasette checks its own)."""
import inspect
from pathlib import Path

from plugserve_plugin_api import hookspecs

DOC = (Path(__file__).resolve().parent.parent / "docs" / "plugin-api.md").read_text()


def _hooks():
    return [(name, fn) for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, "plugserve_spec")]


def test_there_are_hooks():
    assert {name for name, _ in _hooks()} == {"register_platforms", "register_attention_backends", "register_models"}


def test_every_hook_is_documented_with_its_signature():
    for name, fn in _hooks():
        signature = f"`{name}({', '.join(inspect.signature(fn).parameters)})`"
        assert signature in DOC, f"{signature} missing from docs/plugin-api.md"
