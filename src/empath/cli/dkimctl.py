"""`empathctl dkim keygen | list | check | rotate` (DESIGN §12).

``keygen`` needs neither a daemon nor a config (like ``opendkim-genkey``): it writes
the private key (mode 0600, never over an existing file) and prints the TXT record
to publish.  The other three ask the running daemon (control/dkim.py).  Exit codes
as the rest of empathctl; ``check`` exits 1 when a signing selector's record is
missing or does not match its key.
"""

from __future__ import annotations

import sys

from empath.control import output

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    import argparse
    from typing import Any

    from empath.cli.empathctl import Ctx

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the signing domain (d=)")
    p.add_argument("--selector", required=True, help="the selector (s=)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="rsa-sha256")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--out", metavar="FILE", help="key file (default: SELECTOR.DOMAIN.key here)")


def keygen(ctx: Ctx, ns: argparse.Namespace) -> int:
    from pathlib import Path

    from empath.config.dkim import selector_name
    from empath.dkim import keys

    problem = selector_name(ns.selector)
    if problem is not None:
        print(f"empathctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if ns.algorithm == "rsa-sha256" and ns.bits < keys.MIN_RSA_BITS:
        print(f"empathctl: RSA keys need at least {keys.MIN_RSA_BITS} bits", file=sys.stderr)
        return EXIT_USAGE
    domain = ns.domain.lower().rstrip(".")
    path = Path(ns.out or f"{ns.selector}.{domain}.key")
    private = keys.generate(ns.algorithm, ns.bits)
    try:
        keys.write_key(path, private)
    except FileExistsError:
        print(f"empathctl: {path} exists; not overwriting a key", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"empathctl: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    txt = keys.txt_value(private)
    zone = keys.zone_line(ns.selector, domain, txt)
    data = {"domain": domain, "selector": ns.selector, "algorithm": ns.algorithm,
            "key": str(path), "txt": txt, "zone": zone}  # fmt: skip
    ctx.emit(data, f"# wrote {path} (mode 0600); publish:\n{zone}\n")
    return EXIT_OK


def list_run(ctx: Ctx, _ns: argparse.Namespace) -> int:
    rows = ctx.call("dkim.list")
    ctx.emit(rows, "".join(list_line(r) + "\n" for r in rows) or "no DKIM selectors\n")
    return EXIT_OK


def list_line(r: dict[str, Any]) -> str:
    if r["dns_checked_at"] is None:
        dns = "unchecked"
    else:
        verdict = "ok" if r["dns_ok"] else "NOT PUBLISHED"
        dns = f"{verdict} at {output.timestamp(r['dns_checked_at'])}"
    window = f"{output.timestamp(r['not_before'])}..{output.timestamp(r['not_after'])}"
    return (
        f"domain: {r['domain']}, selector: {r['selector']}, algorithm: {r['algorithm']}, "
        f"bits: {r['bits']}, key_age: {output.duration(r['key_age_s'])}, state: {r['state']}, "
        f"window: {window}, signatures: {r['signatures']}, dns: {dns}"
    )


def domain_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="a signing domain of dkim.domains")


def check_run(ctx: Ctx, ns: argparse.Namespace) -> int:
    data = ctx.call("dkim.check", {"domain": ns.domain})
    lines = []
    for s in data["selectors"]:
        mark = "ok" if s["ok"] else ("waiting" if s["pending"] else "FAIL")
        lines.append(f"{mark}: {s['selector']} ({s['algorithm']}): {s['detail']}")
    lines += [f"now signing with {sel} (its record is published)" for sel in data["activated"]]
    lines.append(f"alignment: {data['alignment']}")
    lines += [f"warning: {w}" for w in data["warnings"]]
    ctx.emit(data, "".join(line + "\n" for line in lines))
    return EXIT_OK if data["ok"] else EXIT_FAILED


def rotate_args(p: argparse.ArgumentParser) -> None:
    domain_arg(p)
    p.add_argument("--algorithm", choices=ALGORITHMS,
                   help="rotate only this algorithm (default: every one signing now)")  # fmt: skip
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument(
        "--now", action="store_true", help="sign with the new key at once, not after DNS"
    )


def rotate_run(ctx: Ctx, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"domain": ns.domain, "now": ns.now, "bits": ns.bits}
    if ns.algorithm:
        args["algorithm"] = ns.algorithm
    data = ctx.call("dkim.rotate", args)
    lines = []
    for s in data["selectors"]:
        lines.append(f"# new selector {s['selector']} ({s['algorithm']}), key {s['key']}")
        lines.append(s["zone"])
    if data["active_now"]:
        days = data["overlap_days"]
        lines.append(f"# signing with it now; the old selector stops in {days} days")
    else:
        lines.append(
            "# publish the record above; it starts signing once `empathctl dkim check "
            f"{data['domain']}` (or the daemon's periodic check) sees it, and the old selector "
            f"stops {data['overlap_days']} days later"
        )
    ctx.emit(data, "".join(line + "\n" for line in lines))
    return EXIT_OK
