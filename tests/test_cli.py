"""The `zinfer` command's own wiring: a line that runs one of the mesh's processes gets an app of the services'
commands only (cli/main.py), with the same options, and starts without the client and numpy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from zinfer.cli import main, mesh


def _params(app: typer.Typer, name: str) -> list[tuple]:
    command = typer.main.get_command(app).commands[name]
    return [(p.name, tuple(p.opts), tuple(p.secondary_opts), p.default, p.required) for p in command.params]


def test_a_services_line_gets_the_same_commands_with_the_same_options():
    full, services = main.build(), main.build(services_only=True)
    assert set(typer.main.get_command(services).commands) == set(mesh.SERVICES)
    assert set(mesh.SERVICES) < set(typer.main.get_command(full).commands)
    for name in mesh.SERVICES:
        assert _params(services, name) == _params(full, name), name
    top = typer.main.get_command(services)
    assert [p.opts for p in top.params] == [p.opts for p in typer.main.get_command(full).params if p.expose_value]


@pytest.mark.parametrize("args, service", [
    (["broker"], True),
    (["worker", "--device", "cpu", "-e", "tcp://127.0.0.1:9997"], True),
    (["--debug", "gateway", "--port", "9998"], True),
    (["worker", "--help"], False),  # help lists what the whole command has
    (["list"], False),
    (["launch", "--model-name", "broker"], False),  # the command is the first word, not any word
    ([], False),
])
def test_which_lines_run_a_service(args, service):
    assert main._runs_a_service(args) is service


def test_a_services_line_starts_without_the_client_or_numpy():
    probe = ("import sys\n"
             "from zinfer.cli import main\n"
             "main.build(services_only=main._runs_a_service(['broker']))\n"
             "print(sorted(m for m in ('numpy', 'zinfer.shared.client', 'zinfer.cli.infer_cmds') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_up_takes_the_preloader_the_setting_names(tmp_path, capsys):
    """`auto`: up's own at <home>/run/preloader.sock, which it starts; `none`: none; a socket path: the preloader
    listening there, which up neither starts nor stops (one it cannot find is said at once); no workers: none."""
    from zinfer.shared.config import Settings

    home = tmp_path / "home"
    assert mesh._preloader_for_up(Settings(home=str(home)), True) == (home / "run" / "preloader.sock", True)
    assert mesh._preloader_for_up(Settings(home=str(home)), False) == (None, False)
    assert mesh._preloader_for_up(Settings(home=str(home), preloader="none"), True) == (None, False)
    hosts = tmp_path / "host-preloader.sock"
    hosts.touch()
    assert mesh._preloader_for_up(Settings(home=str(home), preloader=str(hosts)), True) == (hosts, False)
    assert capsys.readouterr().out == ""
    missing = tmp_path / "nobody.sock"
    assert mesh._preloader_for_up(Settings(home=str(home), preloader=str(missing)), True) == (missing, False)
    said = "".join(capsys.readouterr().out.split())  # without the line breaks a console of 80 columns puts in
    assert f"names{missing},wherenonelistens" in said
