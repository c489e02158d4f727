"""Recompute every site's ε of a finished run independently from its ledger.

For each site in ``RUN_DIR/summary.json`` → ``privacy``: the ε the site claimed, and ε recomputed
from ``RUN_DIR/sites/<site>/privacy-ledger.json`` (hash chain and anchor verified) with Opacus'
own ``RDPAccountant`` and ``PRVAccountant`` (not fedtl's memoized RDP path)::

    python simulations/benchmarks/privacy_audit.py runs/default [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fedtl.privacy import read_ledger
from fedtl.privacy.accounting import make_accountant


def audit(run_dir: Path) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for site, claimed in sorted(summary.get("privacy", {}).items(), key=lambda kv: int(kv[0].rsplit("-", 1)[-1])
                                if kv[0].rsplit("-", 1)[-1].isdigit() else kv[0]):
        ledger = read_ledger(run_dir / "sites" / site / "privacy-ledger.json")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rdp = make_accountant("rdp", ledger.history).get_epsilon(ledger.delta)
            prv = make_accountant("prv", ledger.history).get_epsilon(ledger.delta)
        rows.append({"site": site, "claimed": claimed["epsilon"], "budget": claimed["budget"], "delta": ledger.delta,
                     "accountant": ledger.accountant, "rounds": len(ledger.entries), "rdp": rdp, "prv": prv,
                     "ok": claimed["epsilon"] <= rdp + 1e-9 and rdp <= claimed["budget"] + 1e-9})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    rows = audit(args.run_dir)
    if args.markdown:
        print("| site | rounds | claimed ε | Opacus RDP | Opacus PRV | budget |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['site']} | {r['rounds']} | {r['claimed']:.4f} | {r['rdp']:.4f} | {r['prv']:.4f} | {r['budget']:g} |")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
