"""The operator's record of which site each registered key belongs to: ``$FLWR_HOME/fedtl-sites.json``.

Flower 1.41 lists SuperNodes by node id only (``owner-name`` is an account, ``none`` without one), so
``register`` records, per connection, the key's fingerprint (``SHA256:…``, as ``ssh-keygen -lf`` prints it),
the site's name and the node id the SuperLink gave it; ``sites`` shows the name beside each node id and
``unregister`` drops the entry. The file is the operator's own note, written atomically; it grants nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FILE_NAME = "fedtl-sites.json"


def key_fingerprint(public_key: bytes) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key's blob (the whole file's bytes if it is not one)."""
    fields = public_key.split()
    blob = public_key.strip()
    if len(fields) >= 2:
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            pass
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_comment(public_key: bytes) -> str:
    """The comment of an OpenSSH public key line (``site-keys`` writes the site's name there), or ''."""
    fields = public_key.decode("utf-8", "replace").split(maxsplit=2)
    return fields[2].strip() if len(fields) == 3 else ""


def _path(home: Path) -> Path:
    return home / FILE_NAME


def read(home: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{connection: {fingerprint: {"name", "node-id", "public-key", "registered"}}}``; {} when there is none."""
    try:
        data = json.loads(_path(home).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    conns = data.get("connections") if isinstance(data, dict) else None
    return conns if isinstance(conns, dict) else {}


def _write(home: Path, conns: Mapping[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = _path(home)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "connections": conns}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def record(home: Path, connection: str, public_key_path: Path, node_id: int, name: str | None) -> str:
    """Remember that ``public_key_path`` is site ``name`` (else the key's comment, else the file's stem) at
    ``node_id``; returns the name recorded."""
    data = public_key_path.read_bytes()
    site = name or key_comment(data) or public_key_path.stem
    conns = read(home)
    conns.setdefault(connection, {})[key_fingerprint(data)] = {
        "name": site, "node-id": int(node_id), "public-key": str(public_key_path),
        "registered": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _write(home, conns)
    return site


def forget(home: Path, connection: str, node_id: int) -> None:
    conns = read(home)
    entries = conns.get(connection, {})
    kept = {fp: e for fp, e in entries.items() if str(e.get("node-id")) != str(int(node_id))}
    if len(kept) != len(entries):
        conns[connection] = kept
        _write(home, conns)


def annotate(home: Path, connection: str, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each node with ``site-name`` and ``key-fingerprint`` beside its ``node-id`` where the record knows it."""
    by_id = {str(e.get("node-id")): (fp, e) for fp, e in read(home).get(connection, {}).items()}
    out = []
    for node in nodes:
        known = by_id.get(str(node.get("node-id")))
        out.append({**node, "site-name": known[1].get("name"), "key-fingerprint": known[0]} if known else dict(node))
    return out
