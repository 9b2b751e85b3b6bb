"""Entry-point module of the temporary dist-info that target.visible_to_engine writes."""
from plugserve_plugin_api import hookimpl


@hookimpl
def register_platforms(register):
    from plugserve_conformance.target import _PUBLISHED

    for cls in _PUBLISHED:
        register(cls)
