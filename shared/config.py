"""Settings: configs/default.toml, then the file named by ZINFER_CONFIG, then ZINFER_* variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

# zinfer.configs: configs/ beside shared/ in the repository, zinfer/configs/ beside zinfer/shared/ in a wheel.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    endpoint: str = "tcp://127.0.0.1:9997"
    home: str = "~/.zinfer"
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    request_timeout: float = 30.0
    launch_timeout: float = 600.0
    unroutable_grace: float = 2.0
    cpu_memory_budget_mb: int = 0
    send_hwm: int = 10000
    # Largest message any socket accepts (ZMQ_MAXMSGSIZE); see configs/default.toml for how it is sized.
    max_message_mb: int = 64
    # Requests the broker holds for targets nobody serves yet: at most this many, and this many MiB in all.
    park_max_requests: int = 1000
    park_max_mb: int = 64
    # Models whose own Python code (transformers' auto_map, trust_remote_code) may run in a worker. Operators
    # list them here; a launch request can never switch it on.
    trust_remote_code_models: list[str] = []
    # Hubs besides the Hugging Face Hub that a registration's model_hub may name: name -> the endpoint of a server
    # that speaks the Hugging Face Hub's API (a mirror, a company hub). The workers download from it.
    hub_endpoints: dict[str, str] = {}
    # The client's key file; empty: <home>/keys/clients/admin.key_secret, else user.key_secret.
    client_key: str = ""
    # Request limits, checked on arrival before any tokenizing: a prompt (or a chat's text, or an embed
    # request's texts together) in UTF-8 bytes, and the texts of one embed request.
    max_prompt_bytes: int = 4 * 2**20
    max_embed_items: int = 2048
    max_rerank_documents: int = 1000
    # Images of chat messages (shared/images.py): per request, bytes and pixels each; http(s) image URLs fetched
    # only when image_url_fetch is on, and then never from a non-public address unless image_url_private is on;
    # file:// URLs only from these folders.
    max_images: Annotated[int, msgspec.Meta(ge=0, le=64)] = 8
    max_image_bytes: Annotated[int, msgspec.Meta(ge=1)] = 5 * 2**20
    max_image_pixels: Annotated[int, msgspec.Meta(ge=1)] = 4096 * 4096
    image_url_fetch: bool = False
    image_url_private: bool = False
    image_url_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    image_folders: list[str] = []
    # Requests one model instance holds (waiting or running) before new ones get "unavailable" at once.
    instance_queue: int = 256
    # Seconds a chat template may take to render before the request is refused.
    template_timeout_s: float = 1.0
    # The HTTP gateway (OpenAI and Xinference REST APIs). Without gateway_auth, callers without an API key act
    # with this home's user key (never admin).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 9998
    gateway_auth: bool = True
    # Service logs: <home>/logs/<service>.log, one JSON object per line, rotated at log_max_mb.
    log_max_mb: Annotated[int, msgspec.Meta(ge=1)] = 20
    log_backups: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    # llama.cpp's AMX kernels (see configs/default.toml: they crashed every quantized model on our VMs).
    llama_cpp_amx: bool = False
    # Model instances: each replica runs in a process of its own (services/worker/host/supervisor.py).
    # CPU threads of each instance's engine; 0: each engine's default (torch: the cores; llama.cpp: half of them to
    # decode, all to prefill).
    instance_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    # The host's preloader a worker asks for its fork server: "auto" (<home>/run/preloader.sock if one listens),
    # "none", or its socket's path.
    preloader: str = "auto"
    # A crashed instance process is started again after restart_backoff_s, doubling for each further crash up to
    # 30 s; more than restart_limit restarts within restart_window_s leave it `failed` with the last cause.
    restart_backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    restart_limit: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # Seconds a terminated instance's process has to exit after SIGTERM before it is killed.
    terminate_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # Seconds the scheduler waits for a lost worker to come back before it loads that worker's instances on
    # another worker that can hold them.
    worker_return_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Model lifecycle (docs/usage.md, "Lifecycle"). keep_alive: how long an instance stays loaded once idle when
    # its launch does not say (Ollama's OLLAMA_KEEP_ALIVE: "5m", seconds, 0, or negative for ever).
    keep_alive: str = "-1"
    # roles whose requests may carry their own keep_alive, and whose request may load a registration by its name
    keep_alive_roles: list[str] = msgspec.field(default_factory=lambda: ["admin"])
    load_on_request_roles: list[str] = msgspec.field(default_factory=lambda: ["admin"])
    max_loaded_per_device: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no cap; else the LRU idle one makes room
    restore: bool = True  # launched instances are loaded again when the mesh starts (`zinfer up --no-restore`)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 2**20

    @property
    def home_path(self) -> Path:
        return Path(os.path.expanduser(self.home))

    @property
    def liveness_s(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


class ConfigError(Exception):
    """A settings file or variable that cannot be used; the message names it."""


def env_var(field: str) -> str:
    """The variable that sets a field: ZINFER_ and the field's name in capitals (ZINFER_PARK_MAX_REQUESTS)."""
    return "ZINFER_" + field.upper()


def _from_env(environ) -> dict:
    """Every settings field from its ZINFER_* variable, converted (and checked) by msgspec as the files are.
    A list takes comma-separated items; an empty variable counts as unset."""
    values: dict = {}
    for field in msgspec.structs.fields(Settings):
        var = env_var(field.name)
        raw = environ.get(var)
        if not raw:
            continue
        value: object = raw
        if getattr(field.type, "__origin__", None) is list:
            value = [item.strip() for item in raw.split(",") if item.strip()]
        elif getattr(field.type, "__origin__", None) is dict:  # name=value,name=value
            pairs = [item.partition("=") for item in raw.split(",") if item.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(f"{var}={raw!r}: expected name=value pairs, comma-separated")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        try:
            values[field.name] = msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{var}={raw!r}: {exc}") from None
    return values


def _read_toml(path: Path) -> dict:
    try:
        return msgspec.toml.decode(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_settings(**overrides) -> Settings:
    """Layered settings; keyword overrides (from CLI flags) win, None values are ignored."""
    values: dict = _read_toml(CONFIG_DIR / "default.toml")
    user_file = os.environ.get("ZINFER_CONFIG")
    if user_file:
        values.update(_read_toml(Path(user_file)))
    values.update(_from_env(os.environ))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = msgspec.convert(values, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"settings: {exc}") from None
    if settings.heartbeat_interval <= 0 or settings.heartbeat_liveness < 1:
        raise ConfigError("settings: heartbeat_interval must be > 0 and heartbeat_liveness >= 1")
    if settings.max_message_mb < 1 or settings.park_max_requests < 0 or settings.park_max_mb < 0:
        raise ConfigError("settings: max_message_mb must be >= 1; park_max_requests and park_max_mb >= 0")
    if min(settings.max_prompt_bytes, settings.max_embed_items, settings.max_rerank_documents,
           settings.instance_queue) < 1 or settings.template_timeout_s <= 0:
        raise ConfigError("settings: max_prompt_bytes, max_embed_items, max_rerank_documents, instance_queue and "
                          "template_timeout_s must be > 0")
    from zinfer.shared import durations
    from zinfer.shared.errors import InvalidRequest

    try:
        durations.parse(settings.keep_alive, "keep_alive")
    except InvalidRequest as exc:
        raise ConfigError(f"settings: {exc}") from None
    if not settings.endpoint.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"endpoint {settings.endpoint!r}: expected tcp://host:port or ipc:///path")
    return settings
