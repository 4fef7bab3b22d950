"""The S3 store a benchmark reads: a SeaweedFS bucket on 127.0.0.1, set in this process's environment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mtseg.cluster import SeaweedFS


@contextlib.contextmanager
def local_store(data_dir: str) -> Iterator[SeaweedFS]:
    """Start SeaweedFS in ``data_dir`` with its endpoint and keys in ``os.environ``; stop it and restore them after.

    mtseg.storage keys its cached S3 clients on those settings, so none of an earlier store is reused.
    """
    store = SeaweedFS(data_dir=data_dir).start()
    saved = {k: os.environ.get(k) for k in store.env()}
    os.environ.update(store.env())
    try:
        yield store
    finally:
        store.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
