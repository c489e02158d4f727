"""What the aggregation-server operator runs: TLS certificates, SuperNode keys, the SuperLink.

A deployment is one SuperLink (SuperNode authentication on; the Fleet API on a public TLS port, the
Control and Runtime APIs on a loopback or private one: see ``server/superlink.py``) and one SuperNode
per data site. The operator

1. creates a CA and a server certificate (``certs``) and gives ``ca.crt`` to every site;
2. receives each site's public key (a site creates its pair with ``site-keys``) and registers it
   (``register``); a SuperNode whose key was never registered is refused;
3. starts the SuperLink (``start-superlink``) and submits runs with ``flwr run . <connection>``.

Key formats (Flower 1.41): SuperNode keys are NIST elliptic-curve keys (P-384 here) in OpenSSH
format -- ``<name>.key`` is an unencrypted OpenSSH private key (``--auth-supernode-private-key``),
``<name>.pub`` the one-line ``ecdsa-sha2-nistp384 ...`` public key (``flwr supernode register``).
A TLS connection in ``$FLWR_HOME/config.toml`` is ``address`` plus an absolute
``root-certificates`` path (no ``insecure``).

Usage: ``fedtl-server {certs,site-keys,write-connection,start-superlink,register,
unregister,sites,status} ...`` (``--help`` on each), or the same as ``python -m server.ops …``.
``sites`` shows each node's site name (``$FLWR_HOME/fedtl-sites.json``, kept by ``register``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from fedtl.errors import FedTLError
# The operator's library, one module per job; re-exported here so `from server import ops` keeps working.
from server.certs import (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, ServerCerts, _check_name,  # noqa: F401
                          make_ca_and_server_cert, make_site_keypair)
from server.flwr_cli import (_executable, _existing_file, _flwr_home, _flwr_json, list_sites,  # noqa: F401
                             register_site, run_status, superlink_command, supernode_command, unregister_site,
                             write_connection)
from server.processes import (STOP_SIGNALS, ManagedProcess, _run_foreground, terminate_tree,  # noqa: F401
                              wait_for_port)
from server.superlink import DEFAULT_CONTROL_ADDRESS

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtl-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("certs", help="create ca.crt/ca.key/server.crt/server.key")
    c.add_argument("out_dir")
    c.add_argument("--host", action="append", dest="hosts",
                   help="IP or DNS name the SuperLink is reached at (repeat; default 127.0.0.1 and localhost)")
    c.add_argument("--days", type=int, default=365)

    k = sub.add_parser("site-keys", help="create a site's SuperNode key pair <name>.key / <name>.pub")
    k.add_argument("out_dir")
    k.add_argument("name")

    w = sub.add_parser("write-connection", help="add a TLS connection to $FLWR_HOME/config.toml")
    w.add_argument("name")
    w.add_argument("address", help="host:port of the SuperLink")
    w.add_argument("--ca", required=True, help="CA certificate (ca.crt)")
    w.add_argument("--flwr-home", default=None)

    s = sub.add_parser("start-superlink", help="run the SuperLink (TLS, SuperNode auth) in the foreground")
    s.add_argument("--certs", required=True, help="folder with ca.crt, server.crt, server.key")
    s.add_argument("--host", default="127.0.0.1", help="address SuperNodes reach (Fleet API only), e.g. 0.0.0.0")
    s.add_argument("--port", type=int, default=9093)
    s.add_argument("--control-address", default=DEFAULT_CONTROL_ADDRESS,
                   help="loopback or private host:port of the unauthenticated Control API (flwr run, register) "
                        f"and the Runtime API (default {DEFAULT_CONTROL_ADDRESS})")
    s.add_argument("--database", default=None, help="SQLite state file (default: in memory)")

    for name, helptext in (("register", "register a site's public key"),
                           ("unregister", "unregister a SuperNode by node id"),
                           ("sites", "list registered SuperNodes with their site names (JSON)"),
                           ("status", "list runs (JSON)")):
        r = sub.add_parser(name, help=helptext)
        if name == "register":
            r.add_argument("public_key")
            r.add_argument("--name", default=None)
        elif name == "unregister":
            r.add_argument("node_id", type=int)
        r.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
        r.add_argument("--flwr-home", default=None)
    return p



def restart_hint(database: str | None) -> str:
    """What to do after the SuperLink was stopped; ``--database`` is suggested only when it was not passed."""
    keep = (f" (its registered sites are kept in {database})" if database
            else " (pass --database to keep registered sites across restarts)")
    return (f"Start it again with the same command{keep}; a run it was serving resumes from its checkpoint with: "
            "flwr run . <connection> --run-config \"output.dir='<run dir>' output.resume=true\"")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.ops``: operator commands; errors print ``error: …`` and return their exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "certs":
            files = make_ca_and_server_cert(args.out_dir, tuple(args.hosts or ("127.0.0.1", "localhost")), args.days)
            print(f"wrote {files.ca_cert}, {files.ca_key}, {files.server_cert}, {files.server_key}; "
                  f"give {files.ca_cert.name} (only) to every site")
        elif args.command == "site-keys":
            private, public = make_site_keypair(args.out_dir, args.name)
            print(f"wrote {private} (keep at the site) and {public} (send to the operator)")
        elif args.command == "write-connection":
            path = write_connection(args.flwr_home, args.name, args.address, args.ca)
            print(f"connection `{args.name}` -> {args.address} written to {path}")
        elif args.command == "start-superlink":
            cmd = superlink_command(args.certs, args.host, args.port, args.database,
                                    control_address=args.control_address)
            print(" ".join(cmd), file=sys.stderr, flush=True)
            return _run_foreground(cmd, restart_hint(args.database))
        elif args.command == "register":
            node_id = register_site(args.flwr_home, args.connection, args.public_key, args.name)
            print(json.dumps({"node-id": node_id}))
        elif args.command == "unregister":
            unregister_site(args.flwr_home, args.connection, args.node_id)
            print(json.dumps({"unregistered": args.node_id}))
        elif args.command == "sites":
            print(json.dumps(list_sites(args.flwr_home, args.connection), indent=2))
        elif args.command == "status":
            print(json.dumps(run_status(args.flwr_home, args.connection), indent=2))
    except FedTLError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
