"""The plugin API version and the check that a platform was built for it."""
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

# Bump the minor version when a hook or contract method gains an optional
# argument; bump the major version on a removal (after a deprecation warning).
API_VERSION = "1.0"

ENTRY_POINT_GROUP_PLATFORMS = "plugserve.platforms"
ENTRY_POINT_GROUP_PLUGINS = "plugserve.plugins"


def check_api_compatible(package: str, requires: str) -> str | None:
    """Return None when ``requires`` (a PEP 440 range) admits API_VERSION, else the reason."""
    try:
        spec = SpecifierSet(requires)
    except InvalidSpecifier:
        return f"{package} declares an invalid plugin API range {requires!r}"
    if Version(API_VERSION) not in spec:
        return (f"{package} was built for plugserve plugin API {requires}, "
                f"but this plugserve provides API {API_VERSION}; install a {package} release made for API {API_VERSION}")
    return None
