"""`zinfer keys`: create, list, revoke and move the CURVE keys of a mesh (see docs/security.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zinfer.cli.common import friendly_errors, print_json, print_table
from zinfer.shared import keys
from zinfer.shared.config import load_settings

app = typer.Typer(no_args_is_help=True, help="The mesh's keys: who may connect, with which role.")

Home = Annotated[str | None, typer.Option("--home", help="Data folder (default ~/.zinfer or ZINFER_HOME).")]


def _home(home: str | None) -> Path:
    return load_settings(home=home).home_path


@app.command("init")
@friendly_errors
def init(home: Home = None) -> None:
    """Create the broker's keypair, the service key and the admin and user client keys (keeps existing ones)."""
    result = keys.init_keys(_home(home))
    made = ", ".join(result.created) if result.created else "nothing (all keys exist)"
    typer.echo(f"keys in {result.folder}: created {made}")


@app.command("create")
@friendly_errors
def create(
    name: Annotated[str, typer.Argument(help="A name for the key (letters, digits, '_' and '-').")],
    role: Annotated[str, typer.Option("--role", help="user (inference and listing) or admin (also register, "
                                      "launch, terminate, unregister).")] = "user",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the key file here instead of "
                                             "<home>/keys/clients/NAME.key_secret.")] = None,
    home: Home = None,
) -> None:
    """Create a client key with a role; give its file to that client (it sets ZINFER_CLIENT_KEY to it)."""
    key = keys.create_client_key(_home(home), name, role, out)
    typer.echo(f"created {role} key {name!r}: {key.path}")
    typer.echo(f"use it with: ZINFER_CLIENT_KEY={key.path} zinfer list")
    typer.echo(f"API key for HTTP (Authorization: Bearer ...): {keys.api_key_of(key)}")


@app.command("api-key")
@friendly_errors
def api_key(
    name: Annotated[str, typer.Argument(help="A client key's name (its file under <home>/keys/clients/).")],
    home: Home = None,
) -> None:
    """Print the HTTP API key of a client key (the gateway's Authorization: Bearer)."""
    typer.echo(keys.api_key_of(keys.read_key_file(keys.client_key_path(_home(home), name))))


@app.command("list")
@friendly_errors
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    home: Home = None,
) -> None:
    """Every key the broker knows: name, role, public key, when created, whether revoked."""
    roster = keys.read_roster(_home(home))
    if as_json:
        print_json([{"name": k.name, "role": k.role, "public_key": k.public_key, "created": k.created,
                     "revoked": k.revoked, "names": k.names} for k in roster.keys])
        return
    print_table(["Name", "Role", "Public key", "Created", "Revoked", "May hold"],
                [[k.name, k.role, k.public_key[:12] + "...", k.created, k.revoked or "",
                  ", ".join(k.names)] for k in roster.keys])


@app.command("revoke")
@friendly_errors
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")], home: Home = None) -> None:
    """Revoke a key: the running broker refuses it within a heartbeat interval, live connections included."""
    key = keys.revoke_key(_home(home), name)
    typer.echo(f"revoked {key.role} key {name!r} ({key.revoked})")


@app.command("export")
@friendly_errors
def export(
    name: Annotated[str, typer.Argument(help="A name for the other host's key, e.g. gpu-host-2.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle file to write (keep it secret).")],
    home: Home = None,
) -> None:
    """A key bundle for a worker on another host: the broker's public key and a service key of its own that
    may hold worker names only. On that host: `zinfer keys import BUNDLE`, then `zinfer worker -e ...`."""
    keys.export_bundle(_home(home), name, out)
    typer.echo(f"wrote {out} (service key {name!r}, worker names only); revoke it with `zinfer keys revoke {name}`")


@app.command("import")
@friendly_errors
def import_(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `zinfer keys export`.")],
    home: Home = None,
) -> None:
    """Install a bundle from `zinfer keys export` as this host's service key."""
    target = _home(home)
    imported = keys.import_bundle(target, bundle)
    typer.echo(f"imported service key {imported.name!r} into {keys.keys_dir(target)}")
