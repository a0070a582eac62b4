"""Who may connect to the broker: the roster's unrevoked keys (shared/keys.py), asked by ZAP at every handshake
and again for every message, so a revoked key is cut off at once, live connections included."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from zinfer.shared import keys
from zinfer.shared import protocol as p

log = structlog.get_logger()


class Known:
    """An accepted key: what the roster says of it, and the caller stamp its requests carry."""

    __slots__ = ("name", "role", "stamp", "entry")

    def __init__(self, entry: keys.RosterKey):
        self.entry = entry
        self.name = entry.name
        self.role = entry.role
        self.stamp = p.caller_stamp(entry.role, entry.name)


class Roster:
    """The accepted keys by public key (z85), re-read when the roster file changes."""

    def __init__(self, home: Path):
        self.home = home
        self.known: dict[str, Known] = {}
        self.refused = 0
        self._stamp: tuple | None = None
        self.refresh()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP (in the authenticator's thread): is this public key (z85) allowed to connect? A key created a
        moment ago is let in at once: an unknown key makes the roster be read again if its file changed."""
        public = client_key.decode("ascii", "replace")
        allowed = public in self.known or (self.refresh() and public in self.known)
        if not allowed:
            self.refused += 1
            if self.refused <= 10 or self.refused % 1000 == 0:
                log.warning("key_refused", public_key=client_key[:8].decode("ascii", "replace") + "...",
                            refused=self.refused)
        return allowed

    def refresh(self) -> bool:
        """Re-read the roster if its file changed; True when the key table was replaced. Safe from any thread:
        it only swaps `known` (peers are pruned by the broker's own thread, in its tick)."""
        path = keys.roster_path(self.home)
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        try:
            roster = keys.read_roster(self.home)
        except Exception as exc:  # a damaged roster keeps the last good one
            log.error("roster_unreadable", error=str(exc))
            return False
        self._stamp = stamp
        self.known = {public: Known(entry) for public, entry in roster.active().items()}
        log.info("roster_loaded", keys=len(self.known))
        return True
