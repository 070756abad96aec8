"""Pretrained weights that are neither a local file nor cached: one short connection before asking a hub.

Offline, ``huggingface_hub`` and ``torch.hub`` each try the network (huggingface_hub retrying) before they fail:
seconds to minutes per file, and a seed model asks for several. A connection that is refused, or a name that does
not resolve, answers in well under ``PROBE_TIMEOUT_S``, so a machine without network gets a one-line error that says
how to work offline instead of a long wait.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit
from urllib.request import getproxies

from fusionprof.errors import OFFLINE_HINT, UserError

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARIABLES = ("FUSIONPROF_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """The user said so: FUSIONPROF_OFFLINE=1 or HF_HUB_OFFLINE=1."""
    return any(os.environ.get(v) == "1" for v in OFFLINE_VARIABLES)


def _proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``'s scheme (``https_proxy``, ``all_proxy``, either case)."""
    proxies = getproxies()
    return proxies.get(urlsplit(url).scheme) or proxies.get("all")


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens, or to the proxy the environment names for its scheme."""
    target = urlsplit(_proxy(url) or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):  # refused, unresolvable, timed out; a malformed host
        return False


def require(url: str, what: str) -> None:
    """Raise ``UserError`` at once when ``what`` would be fetched from ``url`` and cannot be."""
    if offline():
        raise UserError(f"{what}: not on this machine, and we are offline; {OFFLINE_HINT}")
    if not reachable(url):
        host = urlsplit(_proxy(url) or url).netloc
        raise UserError(f"{what}: not on this machine, and {host} cannot be reached; {OFFLINE_HINT}")


def huggingface_url(name: str) -> str:
    """Where the hub would fetch ``name``'s config (``HF_ENDPOINT`` included)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{name}"


def huggingface_cached(name: str, filename: str) -> bool:
    """Whether ``name`` (a hub id) has ``filename`` in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except ValueError:  # not a valid hub id (a path, say): nothing of it can be cached
        return False


def require_huggingface(name: str, filename: str, what: str) -> None:
    """Before ``from_pretrained(name)``: nothing to check for a local folder or a cached model, else ``require``."""
    if os.path.isdir(name) or huggingface_cached(name, filename):
        return
    require(huggingface_url(name), what)
