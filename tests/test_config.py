import pytest

from zinfer.shared.config import ConfigError, load_settings


def test_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ZINFER_ENDPOINT", raising=False)
    monkeypatch.delenv("ZINFER_HEARTBEAT_INTERVAL", raising=False)
    assert load_settings().endpoint == "tcp://127.0.0.1:9997"
    monkeypatch.setenv("ZINFER_ENDPOINT", "ipc:///tmp/x.sock")
    monkeypatch.setenv("ZINFER_HOME", str(tmp_path))
    s = load_settings()
    assert s.endpoint == "ipc:///tmp/x.sock" and s.home_path == tmp_path
    assert load_settings(endpoint="tcp://127.0.0.1:1").endpoint == "tcp://127.0.0.1:1"


def test_config_file(monkeypatch, tmp_path):
    f = tmp_path / "z.toml"
    f.write_text('heartbeat_interval = 0.5\nrequest_timeout = 3\n')
    monkeypatch.setenv("ZINFER_CONFIG", str(f))
    s = load_settings()
    assert s.heartbeat_interval == 0.5 and s.liveness_s == 1.5


@pytest.mark.parametrize("content,needle", [
    ("heartbeat_interval = 'fast'", "heartbeat_interval"),
    ("nonsense = 1", "nonsense"),
    ("endpoint = 'http://x'", "endpoint"),
    ("[[[", "z.toml"),
])
def test_bad_config_names_the_problem(monkeypatch, tmp_path, content, needle):
    f = tmp_path / "z.toml"
    f.write_text(content)
    monkeypatch.setenv("ZINFER_CONFIG", str(f))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert needle in str(err.value)


def test_bad_env(monkeypatch):
    monkeypatch.setenv("ZINFER_HEARTBEAT_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="ZINFER_HEARTBEAT_INTERVAL"):
        load_settings()


def test_every_setting_has_its_variable(monkeypatch):
    """ZINFER_<FIELD> for every field, checked by msgspec as the files are: numbers, booleans, bounds, lists."""
    import msgspec

    from zinfer.shared.config import Settings, env_var

    for field in msgspec.structs.fields(Settings):
        monkeypatch.delenv(env_var(field.name), raising=False)
    monkeypatch.setenv("ZINFER_PARK_MAX_REQUESTS", "0")
    monkeypatch.setenv("ZINFER_GATEWAY_AUTH", "false")
    monkeypatch.setenv("ZINFER_TRUST_REMOTE_CODE_MODELS", "a, b")
    monkeypatch.setenv("ZINFER_TERMINATE_GRACE_S", "2.5")
    s = load_settings()
    assert (s.park_max_requests, s.gateway_auth, s.trust_remote_code_models, s.terminate_grace_s) == (
        0, False, ["a", "b"], 2.5)
    monkeypatch.setenv("ZINFER_INSTANCE_THREADS", "-1")
    with pytest.raises(ConfigError, match="ZINFER_INSTANCE_THREADS.*>= 0"):
        load_settings()


def test_an_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    """The one helper every state file goes through: the new content, the requested mode, no temporary file
    left; a write that fails at the rename leaves the old file as it was and nothing beside it."""
    import os

    from zinfer.shared.atomic import write_atomic

    target = tmp_path / "state" / "book.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["book.json"]

    def refuse(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_atomic(target, b"newer")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["book.json"]
