"""The durable per-site privacy ledger.

It holds the accountant's history — a short list of ``(noise_multiplier, sample_rate, steps)``
— so a site's ε is always its cumulative spend across rounds, runs and restarts. Writes are
atomic (temporary file + ``os.replace``) and append-only: a save that would drop or rewrite
earlier history is refused, so ε never decreases.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedtl.errors import LedgerError

LEDGER_VERSION = 1


@dataclass
class PrivacyLedger:
    site: str
    target_epsilon: float
    delta: float
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # one entry per round that trained
    plan: dict = field(default_factory=dict)  # {"run": id, "noise_multiplier": σ, "sample_rate": q}
    path: Path | None = field(default=None, repr=False, compare=False)
    _saved_history: list[tuple[float, float, int]] = field(default_factory=list, repr=False, compare=False)

    # ---- persistence -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, site: str, target_epsilon: float, delta: float,
             accountant: str) -> PrivacyLedger:
        """Load the site's ledger, or start an empty one if none exists yet (nothing is written)."""
        p = Path(path)
        if not p.exists():
            return cls(site=site, target_epsilon=target_epsilon, delta=delta, accountant=accountant, path=p)
        try:
            raw = json.loads(p.read_text())
            history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
            ledger = cls(site=raw["site"], target_epsilon=target_epsilon, delta=delta,
                         accountant=raw["accountant"], history=history, rounds=list(raw.get("rounds", [])),
                         plan=dict(raw.get("plan", {})), path=p)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"Privacy ledger {p} is unreadable or corrupt ({exc}). It is left untouched; the site will not "
                "train until it is restored from a backup (deleting it would forget spent privacy)."
            ) from exc
        if ledger.site != site:
            raise LedgerError(f"Privacy ledger {p} belongs to site `{ledger.site}`, not `{site}`.")
        if ledger.accountant != accountant:
            raise LedgerError(
                f"Privacy ledger {p} was kept with the `{ledger.accountant}` accountant; `privacy.accountant` is "
                f"`{accountant}`. Keep the accountant a site started with."
            )
        ledger._saved_history = list(history)
        return ledger

    def save(self) -> None:
        if self.path is None:
            raise LedgerError("this ledger has no path to be saved to")
        if not history_extends(self._saved_history, self.history):
            raise LedgerError(f"Refusing to rewrite the history of {self.path}: a ledger only grows.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "history": [list(h) for h in self.history],
            "rounds": self.rounds,
            "plan": self.plan,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(body, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved_history = list(self.history)

    # ---- accounting --------------------------------------------------------------------
    def epsilon(self, extra: list[tuple[float, float, int]] | None = None) -> float:
        from fedtl.privacy.accounting import epsilon_of

        return epsilon_of(self.history + list(extra or []), self.delta, self.accountant)

    def record_round(self, history: list[tuple[float, float, int]], **info) -> None:
        if not history_extends(self.history, history):
            raise LedgerError("the accountant's history does not extend the ledger's; refusing to record it")
        self.history = [tuple(h) for h in history]
        self.rounds.append({**info, "epsilon": self.epsilon(), "time": time.time()})

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("path", None)
        d.pop("_saved_history", None)
        return d


def _merged(history: list[tuple[float, float, int]]) -> list[list]:
    """Consecutive entries with the same (noise, sample rate) merged, as accountants do."""
    out: list[list] = []
    for sigma, q, steps in history:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1][2] += int(steps)
        else:
            out.append([float(sigma), float(q), int(steps)])
    return out


def history_extends(old: list[tuple[float, float, int]], new: list[tuple[float, float, int]]) -> bool:
    """Whether ``new`` is ``old`` plus more steps (never fewer, never different)."""
    a, b = _merged(old), _merged(new)
    if len(b) < len(a):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if x[:2] != y[:2]:
            return False
        last = i == len(a) - 1
        if (y[2] < x[2]) if last else (y[2] != x[2]):
            return False
    return True
