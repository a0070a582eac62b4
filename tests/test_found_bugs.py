"""Bugs found by reading the code (issue 32), each with a test that failed before its fix."""

from __future__ import annotations

import errno

import pytest

from zinfer.services.worker import files
from zinfer.shared.errors import NotFound, StorageError


def test_a_full_disk_during_a_download_is_a_storage_error_not_not_found(monkeypatch):
    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no dry run against a hub
    with pytest.raises(StorageError, match="the disk is full") as err:
        files._from_hub("someone/some-model", None)
    assert err.value.field == "model_id"

    def refused(*args, **kwargs):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(NotFound):  # what is not this host's disk is still "could not be downloaded"
        files._from_hub("someone/some-model", None)
