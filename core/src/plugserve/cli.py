"""The `plugserve` command line."""
import argparse
import json
import sys


def _platforms(args) -> int:
    from plugserve.platforms import PlatformError, describe, load_registry

    registry = load_registry()
    if args.platform:
        try:
            registry.info_for(args.platform)
        except PlatformError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    report = describe(registry)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"plugserve plugin API {report['api_version']}")
    for p in report["platforms"]:
        state = "usable" if p["usable"] else f"not usable: {p['reason']}"
        print(f"- {p['name']} ({p['package']} {p['version']}, API {p['api_requires']}, priority {p['priority']}): {state}")
        if p["usable"]:
            print(f"    device: {p.get('device')}")
            print(f"    dtypes: {', '.join(p.get('dtypes', []))}; attention: {', '.join(p.get('attention_backends', []))}")
            for key, value in p.get("capabilities", {}).items():
                print(f"    {key}: {value}")
    for f in report["failed_plugins"]:
        print(f"- failed to load {f['entry_point']} ({f['package']}): {f['error']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("platforms", help="list installed platforms and plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--platform", help="check that this platform is installed and usable")
    p.set_defaults(func=_platforms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
