"""A leftover process that is a zombie (or gone) by the time it is named must not fail a finished run."""

import psutil

from fedtl.federation.supervisor import ProcessTreeWatcher


class _Zombie:
    pid = 424242

    def __init__(self):
        self.signals = []

    def cmdline(self):
        raise psutil.ZombieProcess(self.pid)

    def terminate(self):
        self.signals.append("term")

    def kill(self):
        raise psutil.NoSuchProcess(self.pid)


def test_stop_and_reap_survives_a_zombie(monkeypatch):
    zombie = _Zombie()
    watcher = ProcessTreeWatcher()
    monkeypatch.setattr(watcher, "snapshot", lambda: None)
    monkeypatch.setattr(watcher, "alive", lambda: [zombie])
    monkeypatch.setattr(psutil, "wait_procs", lambda procs, timeout: ([], list(procs)))
    watcher.stop_and_reap(grace=0)
    assert zombie.signals == ["term"]
