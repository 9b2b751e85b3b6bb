"""`plugserve conformance ...`: the handler core's CLI calls, importing this package only then."""
import sys
from pathlib import Path

from plugserve_conformance.cases import FAILED, XPASS


def main(args) -> int:
    if getattr(args, "conformance_command", None) == "matrix":
        return _matrix(args)
    return _run(args)


def _run(args) -> int:
    from plugserve.platforms import PlatformError

    from plugserve_conformance import expectations, report, runner
    from plugserve_conformance.cases import DEFAULT_TIERS

    if not args.platform:
        print("error: --platform NAME is required", file=sys.stderr)
        return 2
    tiers = tuple(t.strip() for t in args.tier.split(",")) if args.tier else DEFAULT_TIERS
    try:
        exp = expectations.load(args.expectations)
        rep = runner.run(args.platform, tiers=tiers, pattern=args.k, sweep=args.sweep, expectations=exp,
                         progress=_progress(args.verbose))
    except (PlatformError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        report.write_json(rep, args.report)
    if args.junit:
        report.write_junit(rep, args.junit)
    counts = rep.counts()
    print(f"\n{rep.platform} ({rep.package} {rep.package_version}, API {rep.api_version}) on {rep.device}")
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" in {rep.seconds:.1f} s")
    for r in rep.results:
        if r.status in (FAILED, XPASS):
            print(f"{r.status.upper()} {r.id}: {(r.error or '').splitlines()[0] if r.error else r.reason}")
    return 1 if rep.failed else 0


def _progress(verbose: bool):
    def show(result):
        if verbose:
            print(f"{result.status:11} {result.seconds * 1e3:8.1f} ms  {result.id}", flush=True)
        else:
            print("." if result.status == "passed" else result.status[0].upper(), end="", flush=True)
    return show


def _matrix(args) -> int:
    from plugserve_conformance.matrix import render_files

    text = render_files(args.reports)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
