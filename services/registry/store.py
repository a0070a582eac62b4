"""Persisted custom definitions: <home>/models/<type>/<model_name>.json, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from zinfer.shared.atomic import write_atomic
from zinfer.shared.errors import storage_error
from zinfer.shared.models import Definition, DefinitionError, definition_to_json
from zinfer.shared.protocol import CorruptFile

log = structlog.get_logger()


class DefinitionStore:
    def __init__(self, home: Path):
        self.root = home / "models"

    def path(self, model_type: str, model_name: str) -> Path:
        return self.root / model_type / f"{model_name}.json"

    def save(self, model_type: str, definition: Definition) -> None:
        """Temp file in the same folder, fsync, rename, fsync the folder: a crash leaves old or new, never half.
        A write that fails (disk full, read-only) raises StorageError naming the path; nothing is left."""
        target = self.path(model_type, definition.model_name)
        data = json.dumps(definition_to_json(definition), indent=2).encode()
        try:
            write_atomic(target, data)
        except OSError as exc:
            raise storage_error("persist the definition to", target, exc, field="persist") from None

    def delete(self, model_type: str, model_name: str) -> None:
        path = self.path(model_type, model_name)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error("delete", path, exc) from None

    def load_all(self, model_type: str, parse) -> tuple[dict[str, Definition], list[CorruptFile]]:
        """Every persisted definition of a type; a bad file is reported and skipped, never fatal."""
        found: dict[str, Definition] = {}
        corrupt: list[CorruptFile] = []
        folder = self.root / model_type
        if not folder.is_dir():
            return found, corrupt
        for leftover in folder.glob(".tmp-*"):  # a write that was killed before its rename
            leftover.unlink(missing_ok=True)
        for path in sorted(folder.glob("*.json")):
            try:
                definition = parse(path.read_bytes())
                if definition.model_name != path.stem:
                    raise ValueError(f"file name does not match model_name {definition.model_name!r}")
                found[definition.model_name] = definition
            except (DefinitionError, ValueError, OSError) as exc:
                corrupt.append(CorruptFile(path=str(path), error=str(exc)))
                log.error("corrupt_definition", path=str(path), error=str(exc))
        return found, corrupt
