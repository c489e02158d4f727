"""What a data site runs: validate its site.toml, then start its SuperNode (TLS + node auth).

    python -m clients.site start site.toml --superlink server.example.org:9093 [--port 9094]

The SuperNode gets ``--node-config 'site-config="<site.toml>"'``, so the ClientApp trains on this
site's own data with this site's own privacy budget and ledger (``<state-dir>``). Checking the
data without connecting: ``fedtl site check site.toml``.

Flower reads ``--node-config`` with a regular expression (``key='…'``, ``key="…"`` or a bare word) and
then as TOML, so a path holding ``'`` or ``"`` cannot simply be quoted: :func:`node_config` writes each
value as a TOML basic string in which ``"``, ``\\`` and control characters are ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedtl.errors import ConfigError, FedTLError
from fedtl.site_config import SiteConfig
from server.ops import _run_foreground, supernode_command

# Flower 1.41 starts one ClientApp process per message through the SuperNode's SuperExec, which polls for new
# tasks every second by default (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.01-60 s). Polled every 0.1 s, a
# message waits 0.05 s on average instead of 0.5 s, for ten local requests a second (docs/deployment-timing.md).
# A value the site's operator sets in the environment is kept.
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def start_command(site_config: str | Path, superlink: str, port: int) -> list[str]:
    """The SuperNode command for a validated site; refuses a site whose key or CA files are missing."""
    path = Path(site_config).resolve()
    site = SiteConfig.load(path)
    missing = site.missing_files()
    if missing:
        raise ConfigError("Site file names missing files: " + ", ".join(f"`{k}` = {p}" for k, p in missing))
    if site.auth.private_key is None or site.tls.ca_cert is None:
        raise ConfigError(f"`auth.private-key` and `tls.ca-cert` must be set to join a deployment (in {path}).")
    Path(site.state_dir).mkdir(parents=True, exist_ok=True)
    return supernode_command(superlink, site.tls.ca_cert, site.auth.private_key, port, node_config(site_config=path))


def node_config(**values: str | Path) -> str:
    """``--node-config`` text for string values (``site_config`` → ``site-config``), any characters allowed."""
    def quoted(text: str) -> str:
        return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
                             for c in text) + '"'

    return " ".join(f"{key.replace('_', '-')}={quoted(str(value))}" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.site", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start this site's SuperNode in the foreground")
    p.add_argument("site_config")
    p.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    p.add_argument("--port", type=int, default=9094, help="this SuperNode's own ClientAppIo port")
    p.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    try:
        cmd = start_command(args.site_config, args.superlink, args.port)
    except FedTLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.print_only:
        print(" ".join(cmd))
        return 0
    for key, value in SUPERNODE_ENV.items():  # inherited by the SuperNode and the SuperExec it starts
        os.environ.setdefault(key, value)
    # SIGINT / SIGTERM / SIGHUP stop the SuperNode and every ClientApp process it started (SIGTERM, then
    # SIGKILL), within 15 s; the site's ledger and released updates are on disk, so it simply rejoins.
    return _run_foreground(cmd, "Start the site again with the same command: it rejoins the run and never "
                                "spends privacy twice on a round it already trained.")


if __name__ == "__main__":
    sys.exit(main())
