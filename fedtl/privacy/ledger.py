"""The durable, locked, tamper-evident per-site privacy ledger.

A site's ε is always its cumulative spend across rounds, runs and restarts. The ledger file
(``privacy-ledger.json``) holds one entry per round that trained — ``(noise multiplier, sample
rate, steps)`` plus run, round and ε after it — and the accountant's history is those entries.

Guarantees (each has a test in ``tests/unit/privacy/``):

* **No lost update.** :func:`open_ledger` takes an exclusive ``fcntl.flock`` on ``<ledger>.lock``
  and reads the ledger *under the lock*; the caller trains and saves before the lock is released.
  Two trainings on one state-dir (two runs, one site started twice) serialize; the second sees
  the first's round.
* **Durable before release.** :meth:`PrivacyLedger.save` writes a temporary file, fsyncs it,
  renames it over the ledger and fsyncs the directory, then the anchor (below) the same way. An
  update leaves the site only after ``save`` returned.
* **Tamper evidence.** Every entry carries ``prev`` and ``hash`` (sha256 over the previous hash
  and the entry); the chain starts from a hash of the header (site, accountant, δ, a random
  genesis id), so an edited entry, a changed δ or accountant, or a removed entry is detected on
  open. The anchor file (``<ledger>.anchor``: genesis, entry count, head hash) is what makes a
  deleted or rolled-back ledger detectable: a state-dir that has ever held a ledger refuses to
  start without it. (An attacker with write access to the state-dir can delete both files; that
  is outside the threat model — see docs/privacy.md.)
* **Pinned accounting.** δ and the accountant are fixed when the ledger is created; a policy
  with others is refused rather than silently mixing two accountings.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from fedtl.errors import LedgerError
from fedtl.files import write_atomically

LEDGER_VERSION = 2
ROUND = "round"  # an entry's kind: a federated round …
PERSONALIZE = "personalize"  # … or the site's local fine-tuning after the last one (never sent)
LOCK_TIMEOUT_S = 600.0


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _genesis_hash(site: str, accountant: str, delta: float, genesis: str) -> str:
    return sha256(_canonical({"site": site, "accountant": accountant, "delta": delta, "genesis": genesis})).hexdigest()


def _entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return sha256(_canonical(body)).hexdigest()


@dataclass
class PrivacyLedger:
    site: str
    delta: float
    accountant: str = "rdp"
    target_epsilon: float = 0.0  # the budget in force when last saved (informational; site.toml decides)
    genesis: str = field(default_factory=lambda: secrets.token_hex(16))
    entries: list[dict] = field(default_factory=list)
    plan: dict = field(default_factory=dict)  # noise calibration for the current run (a cache, re-checked)
    path: Path | None = field(default=None, repr=False, compare=False)
    _saved_entries: int = field(default=0, repr=False, compare=False)

    # ---- the accountant's view ----------------------------------------------------------
    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries]

    def run_history(self, run: str) -> list[tuple[float, float, int]]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self.entries if e["run"] == run]

    def rounds_in_run(self, run: str) -> list[int]:
        """Federated rounds trained in ``run`` (the local fine-tuning after them is not a round)."""
        return [int(e["round"]) for e in self.entries if e["run"] == run and e.get("kind", ROUND) == ROUND]

    def personalized(self, run: str) -> bool:
        """Whether this site already spent privacy on local fine-tuning in ``run``."""
        return any(e["run"] == run and e.get("kind") == PERSONALIZE for e in self.entries)

    def epsilon(self, extra: list[tuple[float, float, int]] | None = None) -> float:
        from fedtl.privacy.accounting import epsilon_of

        return epsilon_of(self.history + list(extra or []), self.delta, self.accountant)

    # ---- changes ------------------------------------------------------------------------
    def append(self, *, run: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
               kind: str = ROUND) -> dict:
        """Record one trained round (or, ``kind=PERSONALIZE``, the local fine-tuning after the last round);
        chained to the previous entry. Call :meth:`save` before release."""
        if kind not in (ROUND, PERSONALIZE):
            raise LedgerError(f"refusing to record an entry of unknown kind {kind!r}")
        for name, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LedgerError(f"refusing to record a round with {name}={value!r}")
        if not 0 < sample_rate <= 1 or int(steps) < 1:
            raise LedgerError(f"refusing to record a round with sample_rate={sample_rate}, steps={steps}")
        prev = self.entries[-1]["hash"] if self.entries else self.head_of_genesis()
        entry = {"run": str(run), "round": int(round), "noise_multiplier": float(noise_multiplier),
                 "sample_rate": float(sample_rate), "steps": int(steps), "time": round_time(),
                 "prev": prev}
        if kind != ROUND:  # entries of federated rounds keep the original layout
            entry["kind"] = kind
        entry["epsilon"] = self.epsilon([(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])])
        entry["hash"] = _entry_hash(entry)
        self.entries.append(entry)
        return entry

    def head_of_genesis(self) -> str:
        return _genesis_hash(self.site, self.accountant, self.delta, self.genesis)

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else self.head_of_genesis()

    # ---- persistence --------------------------------------------------------------------
    def save(self) -> None:
        """Durably write the ledger, then its anchor (both fsync'd, directory too)."""
        if self.path is None:
            raise LedgerError("this ledger has no path to be saved to")
        if len(self.entries) < self._saved_entries:
            raise LedgerError(f"Refusing to rewrite the history of {self.path}: a ledger only grows.")
        verify_chain(self)  # never write a chain that would not verify
        body = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "genesis": self.genesis,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon(),
            "entries": self.entries,
            "plan": self.plan,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomically(self.path, json.dumps(body, indent=1, allow_nan=False).encode())
        anchor = {"site": self.site, "genesis": self.genesis, "entries": len(self.entries), "head": self.head}
        write_atomically(anchor_path(self.path), json.dumps(anchor, indent=1).encode())
        self._saved_entries = len(self.entries)

    def as_dict(self) -> dict:
        return {"site": self.site, "accountant": self.accountant, "delta": self.delta,
                "target_epsilon": self.target_epsilon, "epsilon": self.epsilon(), "entries": list(self.entries)}


def round_time() -> float:
    return round(time.time(), 3)


def anchor_path(path: Path) -> Path:
    return path.with_name(path.name + ".anchor")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def verify_chain(ledger: PrivacyLedger) -> None:
    prev = ledger.head_of_genesis()
    for i, entry in enumerate(ledger.entries):
        if entry.get("prev") != prev or entry.get("hash") != _entry_hash(entry):
            where = f" ({ledger.path})" if ledger.path else ""
            raise LedgerError(
                f"Privacy ledger{where} fails its integrity check at entry {i + 1} of {len(ledger.entries)}: it was "
                "edited, truncated or its header (site, accountant, δ) changed. It is left untouched; restore it from "
                "a backup before this site trains again."
            )
        prev = entry["hash"]


def _read(path: Path) -> PrivacyLedger:
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {raw.get('version')!r} (this fedtl writes {LEDGER_VERSION})")
        ledger = PrivacyLedger(site=str(raw["site"]), delta=float(raw["delta"]), accountant=str(raw["accountant"]),
                               target_epsilon=float(raw.get("target_epsilon", 0.0)), genesis=str(raw["genesis"]),
                               entries=[dict(e) for e in raw["entries"]], plan=dict(raw.get("plan") or {}), path=path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(
            f"Privacy ledger {path} is unreadable or corrupt ({exc}). It is left untouched; the site will not train "
            "until it is restored from a backup (deleting it would forget spent privacy)."
        ) from exc
    verify_chain(ledger)
    ledger._saved_entries = len(ledger.entries)
    return ledger


def _check_anchor(path: Path, ledger: PrivacyLedger | None) -> None:
    anchor = anchor_path(path)
    if not anchor.exists():
        return  # a ledger saved before its anchor (crash in between): the next save writes it
    try:
        a = json.loads(anchor.read_text())
        count, head, genesis = int(a["entries"]), str(a["head"]), str(a["genesis"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"Privacy ledger anchor {anchor} is unreadable ({exc}); restore the state-dir from a backup.") from exc
    if ledger is None:
        raise LedgerError(
            f"Privacy ledger {path} is missing, but this state-dir has held one ({count} trained round(s), recorded "
            f"in {anchor.name}). Spent privacy cannot be forgotten: restore {path.name} from a backup. A site that "
            "really starts over with new data needs a new, empty state-dir."
        )
    if genesis != ledger.genesis or count > len(ledger.entries) or (count and ledger.entries[count - 1]["hash"] != head):
        raise LedgerError(
            f"Privacy ledger {path} is older than, or not the one, its anchor {anchor.name} records ({count} rounds): "
            "it was rolled back or replaced. Restore the latest ledger from a backup."
        )


@contextlib.contextmanager
def open_ledger(path: str | os.PathLike, *, site: str, delta: float, accountant: str,
                target_epsilon: float = 0.0, timeout: float = LOCK_TIMEOUT_S) -> Iterator[PrivacyLedger]:
    """The site's ledger, read under an exclusive lock held until the block ends.

    A new ledger is created (in memory; nothing is written until :meth:`PrivacyLedger.save`)
    only when the state-dir never held one.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(p), "a+") as lock:
        _acquire(lock, p, timeout)
        try:
            ledger = _read(p) if p.exists() else None
            _check_anchor(p, ledger)
            if ledger is None:
                ledger = PrivacyLedger(site=site, delta=float(delta), accountant=accountant, path=p)
            check_identity(ledger, p, site=site, delta=delta, accountant=accountant)
            if target_epsilon:
                ledger.target_epsilon = float(target_epsilon)
            yield ledger
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_ledger(path: str | os.PathLike) -> PrivacyLedger:
    """Read and verify a ledger (no lock, nothing written): for inspection and reports."""
    p = Path(path)
    if not p.exists():
        _check_anchor(p, None)
        raise LedgerError(f"No privacy ledger at {p}: this site has not trained yet.")
    ledger = _read(p)
    _check_anchor(p, ledger)
    return ledger


def _acquire(lock, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() > deadline:
                raise LedgerError(f"Privacy ledger {path} stayed locked by another training for {timeout:.0f} s; "
                                  "is the same site running twice?") from exc
            time.sleep(0.05)


def check_identity(ledger: PrivacyLedger, path: Path, *, site: str, delta: float, accountant: str) -> None:
    if ledger.site != site:
        raise LedgerError(f"Privacy ledger {path} belongs to site `{ledger.site}`, not `{site}`.")
    if ledger.accountant != accountant:
        raise LedgerError(
            f"Privacy ledger {path} was kept with the `{ledger.accountant}` accountant; the site's policy says "
            f"`{accountant}`. Keep the accountant a site started with."
        )
    if ledger.delta != float(delta):
        raise LedgerError(
            f"Privacy ledger {path} accounts at δ={ledger.delta:g}; the site's policy says δ={float(delta):g}. "
            "δ is pinned when a ledger starts; keep it."
        )
