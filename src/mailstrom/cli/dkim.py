"""``mailstrom dkim keygen``: make a DKIM signing key and say what to publish in DNS."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mailstrom.cli.exits import EX_CANTCREAT, EX_OK, CLIError, UsageError
from mailstrom.cli.output import print_json
from mailstrom.cli.parsing import Subparsers, path_arg
from mailstrom.dkim.keys import (
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RECOMMENDED_RSA_BITS,
    DKIMAlgorithm,
    DKIMKey,
    check_selector,
    generate_private_key,
    record_name,
    signing_domain,
    write_private_file,
)
from mailstrom.errors import ConfigError

EPILOG = """\
examples:
  mailstrom dkim keygen --domain example.com --selector s2026r
  mailstrom dkim keygen --domain example.com --selector s2026e --algorithm ed25519 \\
      --out /etc/mailstrom/dkim/example.com.s2026e.pem

The key file is created with mode 0600 and never overwritten. Publish the printed TXT
record, then add the printed [[dkim.keys]] table to the configuration. Sign with an RSA
and an Ed25519 key together: not every receiver verifies Ed25519 yet (RFC 8463).
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    dkim = sub.add_parser(
        "dkim",
        help="DKIM signing keys",
        description="DKIM signing keys: make one and print the DNS record that publishes it.",
    )
    actions = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    k = actions.add_parser(
        "keygen",
        parents=parents,
        help="make a signing key and print its DNS TXT record",
        description="Write a new private key to a file (mode 0600, refusing to replace one) "
        "and print the DNS TXT record that publishes its public half, with the "
        "[[dkim.keys]] table to configure it.",
        epilog=EPILOG,
    )
    k.add_argument("--domain", required=True, help="the signing domain (d=), e.g. example.com")
    k.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    k.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (rsa-sha256, verified everywhere; the default) or ed25519 (ed25519-sha256)",
    )
    k.add_argument(
        "--bits",
        type=int,
        default=None,
        help=f"RSA key size, {MIN_RSA_BITS}-{MAX_RSA_BITS} (default {RECOMMENDED_RSA_BITS})",
    )
    k.add_argument(
        "--out",
        metavar="PATH",
        type=path_arg,
        help="private key file to create (default: DOMAIN.SELECTOR.pem here)",
    )
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(handler=keygen_command)


def keygen_command(args: argparse.Namespace) -> int:
    algorithm = DKIMAlgorithm.named(args.algorithm)
    if args.bits is not None and algorithm is not DKIMAlgorithm.RSA_SHA256:
        raise UsageError("--bits applies to RSA keys only (Ed25519 keys have one size)")
    bits = RECOMMENDED_RSA_BITS if args.bits is None else args.bits
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise UsageError(
            f"--bits must be {MIN_RSA_BITS} to {MAX_RSA_BITS} (RFC 8301 §3.2), got {bits}"
        )
    try:
        # Checked before the (slow) key generation, and before anything is written.
        domain = signing_domain(args.domain, label="--domain")
        check_selector(args.selector, label="--selector")
        record_name(domain, args.selector, label="--selector")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    path = Path(args.out or f"{domain}.{args.selector}.pem")
    pem = generate_private_key(algorithm, bits=bits)
    try:
        write_private_file(path, pem)
    except FileExistsError:
        raise CLIError(
            f"{path} exists; mailstrom never replaces a key file", EX_CANTCREAT
        ) from None
    except OSError as exc:
        raise CLIError(f"cannot create {path}: {exc.strerror or exc}", EX_CANTCREAT) from None
    key = DKIMKey(domain=domain, selector=args.selector, private_key=path, algorithm=algorithm)
    record = key.dns_record()
    if args.json:
        print_json(
            {
                "private_key": str(path),
                "domain": key.domain,
                "selector": key.selector,
                "algorithm": key.algorithm.value,
                "bits": key.bits,
                "dns_name": record.name,
                "dns_type": "TXT",
                "dns_strings": list(record.strings),
            }
        )
        return EX_OK
    out = sys.stdout
    out.write(
        f"wrote {key.algorithm.value} private key ({key.bits} bits) to {path} (mode 0600)\n\n"
    )
    out.write("publish this DNS TXT record:\n\n")
    out.write(f"  name:  {record.name}\n")
    out.write("  value: " + " ".join(f'"{s}"' for s in record.strings) + "\n\n")
    out.write("as a zone file line:\n\n")
    out.write(f"  {record.zone_line()}\n\n")
    out.write("then add to the configuration:\n\n")
    out.write("  [[dkim.keys]]\n")
    out.write(f"  domain = {toml_string(key.domain)}\n")
    out.write(f"  selector = {toml_string(key.selector)}\n")
    out.write(f"  private_key = {toml_string(str(path.resolve()))}\n")
    out.write(f"  algorithm = {toml_string(key.algorithm.value)}\n")
    return EX_OK


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: a file name may hold a quote, which would end the
    string, or a backslash, which TOML reads as an escape (``\\t`` as a tab)."""
    # JSON's escapes are TOML's, except that TOML wants DEL escaped too (TOML 1.0 §String).
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
