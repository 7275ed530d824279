"""Hub ids on a machine without network: find out up front, in seconds, instead of after a minute of retries.

A recipe may name a model by hub id. Where the hub cannot be reached (a cluster node, an air-gapped machine),
huggingface_hub retries each file for about 50 s before it fails. One short connection attempt tells first;
then the hub client is put in offline mode, so a model already in the local cache loads at once and a missing
one fails at once, with a line that says why.
"""

from __future__ import annotations

import os
import re
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROBE_SECONDS = 3.0
_probe_failed: list[bool] = []  # a failed probe put the hub client offline (not the user's HF_HUB_OFFLINE)


def is_hub_id(name: str) -> bool:
    """A name that is not a local path and reads as `org/name` (or `name`)."""
    return not Path(os.path.expanduser(name)).exists() and bool(HUB_ID.match(name)) and not name.endswith(".gguf")


def offline_mode() -> bool:
    """Whether the hub client is in offline mode (HF_HUB_OFFLINE, or set here after a failed probe)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@cache
def hub_reachable() -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT or the default), at most PROBE_SECONDS."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def prepare_hub_access(name: str) -> None:
    """Before the first load of a hub id: if the hub cannot be reached, use the local cache only."""
    if not is_hub_id(name) or offline_mode() or hub_reachable():
        return
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes (launched runs) too
    constants.HF_HUB_OFFLINE = True
    _probe_failed.append(True)


def offline_explanation(name: str) -> str | None:
    """Why a hub id could not be loaded when the hub client is offline; None otherwise."""
    if not is_hub_id(name) or not offline_mode():
        return None
    why = "the hub cannot be reached from this machine" if _probe_failed else "HF_HUB_OFFLINE is set"
    return (
        f"model.name_or_path: {name!r} is not a local path, {why}, and it is not in the local Hugging Face "
        "cache; download it where there is network and point the recipe at that directory"
    )
