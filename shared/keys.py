"""CURVE keys and the roster of who may connect, under <ZINFER_HOME>/keys/ (folder 0700, files 0600).

    broker.key_secret     the broker's server keypair; broker.key holds its public half
    service.key_secret    the keypair registry, scheduler and workers connect with (role "service")
    clients/NAME.key_secret   client keypairs (role "admin" or "user"); each carries the broker's public key,
                          so the one file is all a client on another machine needs
    roster.json           every key the broker accepts: name, role, public key, which service names it may
                          hold, and whether it is revoked. The broker re-reads it when it changes.

Key files use the ZeroMQ certificate layout (ZPL text: a `metadata` and a `curve` section). The roster is
written atomically (temporary file, fsync, rename); a lock file serialises writers.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import zmq
import zmq.utils.z85

from zinfer.shared.atomic import write_atomic
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound, Unauthenticated
from zinfer.shared.models import NAME_PATTERN, NAME_RE
from zinfer.shared.protocol import ADMIN, USER, Role

CLIENT_ROLES = (ADMIN, USER)
KeyName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
Z85Key = Annotated[str, msgspec.Meta(min_length=40, max_length=40)]

BROKER = "broker"
SERVICE = "service"
WORKER_NAMES = ["worker/*"]  # what a key exported for a worker host may hold


class RosterKey(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: KeyName
    role: Role
    public_key: Z85Key
    created: str
    revoked: str | None = None
    # Service names this key may hold (fnmatch patterns); only for role "service". Empty means any.
    names: list[str] = []

    def may_hold(self, service: str) -> bool:
        return not self.names or any(fnmatch.fnmatchcase(service, pattern) for pattern in self.names)


class Roster(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: Literal[1] = 1
    keys: list[RosterKey] = []

    def active(self) -> dict[str, RosterKey]:
        """Public key (z85 text) -> entry, for keys that are not revoked."""
        return {k.public_key: k for k in self.keys if k.revoked is None}

    def by_name(self, name: str) -> RosterKey | None:
        return next((k for k in self.keys if k.name == name), None)


class KeyFile(msgspec.Struct, kw_only=True):
    """One key file: its keypair (secret may be empty for a public file) and metadata."""

    path: str
    name: str
    role: str
    public: bytes
    secret: bytes = b""
    broker_key: bytes = b""  # client and service files: the broker's public key

    def apply(self, sock: zmq.Socket, server_key: bytes | None = None) -> None:
        """Make `sock` a CURVE client of the broker with this keypair."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server_key or self.broker_key


def keys_dir(home: Path) -> Path:
    return Path(home) / "keys"


def client_key_path(home: Path, name: str) -> Path:
    return keys_dir(home) / "clients" / f"{name}.key_secret"


# ---------------------------------------------------------------- files

_LINE = re.compile(r'^\s*([A-Za-z0-9_-]+)\s*=\s*"([^"]*)"\s*$')


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the start (never readable by others, even for a moment)."""
    write_atomic(path, data, mode=0o600)


def write_key_file(path: Path, name: str, role: str, public: bytes, secret: bytes = b"",
                   broker_key: bytes = b"") -> KeyFile:
    kind = "secret key: give this file to no one else" if secret else "public key"
    lines = [f"#   zinfer CURVE {kind}", f"#   written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
             "", "metadata", f'    name = "{name}"', f'    role = "{role}"']
    if broker_key:
        lines.append(f'    broker-key = "{broker_key.decode()}"')
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    _write_private(path, ("\n".join(lines) + "\n").encode())
    return KeyFile(path=str(path), name=name, role=role, public=public, secret=secret, broker_key=broker_key)


def read_key_file(path: Path) -> KeyFile:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise Unauthenticated(f"cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise Unauthenticated(f"{path} is not a zinfer key file (not text)") from None
    values = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            values[m.group(1)] = m.group(2)
    public = values.get("public-key", "")
    if len(public) != 40:
        raise Unauthenticated(f"{path} is not a zinfer key file (no 40-character public-key)")
    secret = values.get("secret-key", "")
    if secret and len(secret) != 40:
        raise Unauthenticated(f"{path}: secret-key must be 40 characters")
    return KeyFile(path=str(path), name=values.get("name", Path(path).stem), role=values.get("role", ""),
                   public=public.encode(), secret=secret.encode(), broker_key=values.get("broker-key", "").encode())


# ---------------------------------------------------------------- roster

_roster_decoder = msgspec.json.Decoder(Roster)


def roster_path(home: Path) -> Path:
    return keys_dir(home) / "roster.json"


def read_roster(home: Path) -> Roster:
    path = roster_path(home)
    try:
        return _roster_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return Roster()
    except OSError as exc:
        raise Unauthenticated(f"cannot read {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Unauthenticated(f"{path} is damaged: {exc}") from None


def _write_roster(home: Path, roster: Roster) -> None:
    _write_private(roster_path(home), msgspec.json.format(msgspec.json.encode(roster), indent=2))


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    folder = keys_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _add_key(home: Path, roster: Roster, path: Path, name: str, role: str, names: list[str] | None = None,
             broker_key: bytes = b"") -> KeyFile:
    existing = roster.by_name(name)
    if existing is not None:
        state = "revoked" if existing.revoked else "active"
        raise Conflict(f"a key named {name!r} already exists ({existing.role}, {state}); pick another name")
    public, secret = zmq.curve_keypair()
    key = write_key_file(path, name, role, public, secret, broker_key)
    roster.keys.append(RosterKey(name=name, role=role, public_key=public.decode(), created=_now(),
                                 names=list(names or [])))
    return key


# ---------------------------------------------------------------- operations


class InitResult(msgspec.Struct):
    folder: str
    created: list[str]


def init_keys(home: Path) -> InitResult:
    """Create what is missing: the broker keypair, the service key, and the `admin` and `user` client keys.
    Idempotent: existing keys are kept (so running clients and services keep working)."""
    home = Path(home)
    created: list[str] = []
    with _locked(home):
        folder = keys_dir(home)
        secret_file = folder / f"{BROKER}.key_secret"
        if not secret_file.exists():
            public, secret = zmq.curve_keypair()
            write_key_file(secret_file, BROKER, BROKER, public, secret)
            write_key_file(folder / f"{BROKER}.key", BROKER, BROKER, public)
            created.append(BROKER)
        broker = read_key_file(secret_file)
        roster = read_roster(home)
        wanted = [(folder / f"{SERVICE}.key_secret", SERVICE, "service")]
        wanted += [(client_key_path(home, role), role, role) for role in CLIENT_ROLES]
        for path, name, role in wanted:
            if roster.by_name(name) is None and not path.exists():
                _add_key(home, roster, path, name, role, broker_key=broker.public)
                created.append(name)
        if created:
            _write_roster(home, roster)
    return InitResult(folder=str(keys_dir(home)), created=created)


def create_client_key(home: Path, name: str, role: str, out: Path | None = None) -> KeyFile:
    if role not in CLIENT_ROLES:
        raise InvalidRequest(f"role {role!r} must be one of {list(CLIENT_ROLES)}", field="role")
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"key name {name!r} must be letters, digits, '_' and '-', starting with a letter or "
                             "digit", field="name")
    with _locked(home):
        broker = broker_public_key(home)
        roster = read_roster(home)
        key = _add_key(home, roster, out or client_key_path(home, name), name, role, broker_key=broker)
        _write_roster(home, roster)
    return key


def revoke_key(home: Path, name: str) -> RosterKey:
    with _locked(home):
        roster = read_roster(home)
        key = roster.by_name(name)
        if key is None:
            raise NotFound(f"no key named {name!r} (see `zinfer keys list`)", field="name")
        if key.revoked is None:
            key.revoked = _now()
            _write_roster(home, roster)
    return key


def broker_public_key(home: Path) -> bytes:
    path = keys_dir(home) / f"{BROKER}.key"
    if not path.exists():
        raise Unauthenticated(f"no broker key in {keys_dir(home)}: run `zinfer keys init` (or `zinfer up`) first")
    return read_key_file(path).public


class Bundle(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `keys export` writes for another host: the broker's public key and a service key of its own."""

    zinfer_key_bundle: Literal[1] = 1
    name: KeyName
    role: Role
    names: list[str] = []
    broker_key: Z85Key
    public_key: Z85Key
    secret_key: Z85Key


def export_bundle(home: Path, name: str, out: Path, names: list[str] | None = None) -> Bundle:
    """A new service key named `name` that may hold only `names` (default: worker names), for another host.
    Revoking `name` later cuts that host off alone."""
    with _locked(home):
        broker = broker_public_key(home)
        roster = read_roster(home)
        if roster.by_name(name) is not None:
            raise Conflict(f"a key named {name!r} already exists; pick another name for this host")
        public, secret = zmq.curve_keypair()
        bundle = Bundle(name=name, role="service", names=list(names or WORKER_NAMES), broker_key=broker.decode(),
                        public_key=public.decode(), secret_key=secret.decode())
        _write_private(Path(out), msgspec.json.format(msgspec.json.encode(bundle), indent=2))
        roster.keys.append(RosterKey(name=name, role="service", public_key=bundle.public_key, created=_now(),
                                     names=bundle.names))
        _write_roster(home, roster)
    return bundle


def import_bundle(home: Path, bundle_file: Path) -> Bundle:
    """Install an exported bundle as this host's service key (and the broker's public key)."""
    try:
        bundle = msgspec.json.decode(Path(bundle_file).read_bytes(), type=Bundle)
    except OSError as exc:
        raise Unauthenticated(f"cannot read {bundle_file}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Unauthenticated(f"{bundle_file} is not a zinfer key bundle: {exc}") from None
    with _locked(home):
        folder = keys_dir(home)
        write_key_file(folder / f"{BROKER}.key", BROKER, BROKER, bundle.broker_key.encode())
        write_key_file(folder / f"{SERVICE}.key_secret", bundle.name, bundle.role, bundle.public_key.encode(),
                       bundle.secret_key.encode(), bundle.broker_key.encode())
    return bundle


# ---------------------------------------------------------------- loading for processes


def load_broker_key(home: Path) -> KeyFile:
    path = keys_dir(home) / f"{BROKER}.key_secret"
    if not path.exists():
        raise Unauthenticated(f"no broker key at {path}: run `zinfer keys init` (or `zinfer up`) first")
    key = read_key_file(path)
    if not key.secret:
        raise Unauthenticated(f"{path} holds no secret key")
    return key


def load_service_key(home: Path) -> KeyFile:
    path = keys_dir(home) / f"{SERVICE}.key_secret"
    if not path.exists():
        raise Unauthenticated(f"no service key at {path}: run `zinfer keys init` on the broker's host, or "
                        "`zinfer keys import BUNDLE` on another host")
    return _secret_key(home, path)


def _secret_key(home: Path, path: Path) -> KeyFile:
    """A key file that must hold a secret key, with the broker's public key filled in from this home if absent."""
    key = read_key_file(path)
    if not key.secret:
        raise Unauthenticated(f"{path} holds no secret key (it is a public key file)")
    if not key.broker_key:
        key.broker_key = broker_public_key(home)
    return key


def client_key_candidates(home: Path, explicit: str | None = None) -> list[Path]:
    """Where a client looks for its key, in order: the explicit path (ZINFER_CLIENT_KEY / client_key setting),
    else the admin key, else the user key of this home."""
    if explicit:
        return [Path(os.path.expanduser(explicit))]
    return [client_key_path(home, "admin"), client_key_path(home, "user")]


def load_client_key(home: Path, explicit: str | None = None) -> KeyFile:
    tried = client_key_candidates(home, explicit)
    for path in tried:
        if path.exists():
            return _secret_key(home, path)
    where = " or ".join(str(p) for p in tried)
    raise Unauthenticated(f"no client key: tried {where}. Create keys with `zinfer keys init` (done by `zinfer up`), "
                    "or ask an admin for one (`zinfer keys create NAME --role user`) and set ZINFER_CLIENT_KEY "
                    "to its file")


# ---------------------------------------------------------------- API keys (HTTP)


def api_key_of(key: KeyFile) -> str:
    """The HTTP API key of a client key: its CURVE secret key, as 'zk-' and 64 hex digits. The gateway connects to
    the bus with exactly that keypair, so an API key has its key's role, and revoking the key revokes it."""
    return "zk-" + zmq.utils.z85.decode(key.secret).hex()


def key_from_api_key(api_key: str, broker_key: bytes) -> KeyFile:
    """The keypair behind an API key (raises Unauthenticated for anything that is not one)."""
    token = api_key.strip()
    if not token.startswith("zk-") or len(token) != 67:
        raise Unauthenticated("not a zinfer API key (expected zk- and 64 hex digits; `zinfer keys create NAME` "
                              "prints one)")
    try:
        secret = zmq.utils.z85.encode(bytes.fromhex(token[3:]))
    except ValueError:
        raise Unauthenticated("not a zinfer API key (not hex)") from None
    return KeyFile(path="(API key)", name="api-key", role="", public=zmq.curve_public(secret), secret=secret,
                   broker_key=broker_key)
