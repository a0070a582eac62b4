"""What a Hugging Face Hub failure means to a zinfer user: one typed error naming the field at fault, the same for
a worker's download and for a registration filled in from a Hub id."""

from __future__ import annotations

from zinfer.shared.errors import Forbidden, NotFound, ZinferError


def hub_error(exc: BaseException, model_id: str, revision: str | None, filename: str | None = None,
              token_for: str = "") -> ZinferError | None:
    """The typed error for huggingface_hub's own exceptions (None for anything else: the caller decides).
    `token_for` says where HF_TOKEN goes (" for the workers")."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):  # a RepositoryNotFoundError too: first
        return Forbidden(f"model_id {model_id!r} is gated on {constants.ENDPOINT}: accept its terms there and set "
                         f"HF_TOKEN{token_for}", field="model_id")
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound(f"model_id {model_id!r}: no such repository on {constants.ENDPOINT} (or it is private: set "
                        f"HF_TOKEN{token_for})", field="model_id")
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(f"model_revision {revision!r}: repository {model_id!r} has no such revision",
                        field="model_revision")
    if isinstance(exc, EntryNotFoundError):
        return NotFound(f"model_file_name_template: repository {model_id!r} has no file {filename!r}",
                        field="model_file_name_template")
    return None
