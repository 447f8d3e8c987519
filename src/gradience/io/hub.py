"""Is a Hugging Face hub id usable here, decided in seconds instead of a minute of retries.

``transformers`` / ``datasets`` / ``huggingface_hub`` retry HEAD requests with back-off when the hub cannot be
reached: a hub id that is not in the local cache then fails only after ~60 s (measured: 58 s for the toy run's
``--model distilbert-base-uncased`` on a machine without network). Every place where Gradience loads by hub id
(toy run ``--model``/``--dataset``, bench, ``--base-model``) asks here first: a cached id is loaded offline,
an uncached id with no reachable hub fails at once with one line that says how to proceed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradience.errors import InputError

PROBE_TIMEOUT_S = 2.0    # DNS lookup and TCP connect, each; the whole check stays well under 5 s
_OFFLINE_VALUES = {"1", "true", "yes", "on"}
_reachable: dict[str, bool] = {}   # per endpoint, once per process


def hub_cache_dir() -> Path:
    """The hub cache the Hugging Face libraries would use: $HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
    return _hf_cache_dir("HF_HUB_CACHE", "hub")


def _hf_cache_dir(own_variable: str, sub: str) -> Path:
    """$<own_variable>, else $HF_HOME/<sub>, else $XDG_CACHE_HOME (or ~/.cache)/huggingface/<sub>: the order
    huggingface_hub's and datasets' ``config.py`` resolve their caches in."""
    if os.environ.get(own_variable):
        return Path(os.environ[own_variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / sub
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / sub


def offline_requested() -> bool:
    """The user said offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(var, "").strip().lower() in _OFFLINE_VALUES
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_target() -> tuple[str, int]:
    """The host a hub request would first connect to: the HTTPS proxy when one is set, else the endpoint."""
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urlsplit(url if "//" in url else f"//{url}")
    default_port = 443 if (parts.scheme or "https") == "https" else 80
    return parts.hostname or "huggingface.co", parts.port or default_port


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds.

    ``getaddrinfo`` has no timeout of its own, so the lookup runs in a daemon thread that is abandoned
    when it takes too long. Answered once per process. (socket/threading imported here: the audit imports
    this module on every run and never probes unless asked to download.)"""
    import contextlib
    import socket
    import threading

    if offline_requested():
        return False
    host, port = _probe_target()
    key = f"{host}:{port}"
    if key in _reachable:
        return _reachable[key]
    found: list[Any] = []

    def lookup() -> None:
        with contextlib.suppress(OSError):
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    ok = False
    for family, kind, proto, _name, address in found[:2]:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
            ok = True
            break
        except OSError:
            continue
    _reachable[key] = ok
    return ok


def cached_repo_dir(repo_id: str, repo_type: str = "model") -> Path | None:
    """The local cache directory of a hub repo (``models--org--name`` / ``datasets--org--name``) when it holds
    at least one snapshot, else None."""
    prefix = {"model": "models", "dataset": "datasets"}[repo_type]
    repo_dir = hub_cache_dir() / f"{prefix}--{repo_id.replace('/', '--')}"
    try:
        snapshots = repo_dir / "snapshots"
        if snapshots.is_dir() and any(snapshots.iterdir()):
            return repo_dir
        if repo_type == "dataset":  # the datasets library's own cache of prepared data: <cache>/<org>___<name>
            prepared = _datasets_cache_dir() / repo_id.replace("/", "___")
            return prepared if prepared.is_dir() else None
    except (OSError, ValueError):
        pass
    return None


def _datasets_cache_dir() -> Path:
    return _hf_cache_dir("HF_DATASETS_CACHE", "datasets")


def how_to_proceed(repo_id: str, repo_type: str, flag: str, config: str | None = None) -> str:
    """The one sentence every 'hub id not available' error ends with (``flag``: a command-line flag such as
    ``--model``, or a config key such as ``model.name``)."""
    use = f"pass {flag} DIR" if flag.startswith("-") else f"set {flag} to DIR"
    if repo_type == "dataset":
        args = f"{repo_id!r}, {config!r}" if config else repr(repo_id)
        return f"on a machine with network, save it with datasets.load_dataset({args}).save_to_disk(DIR) and {use}"
    return (f"on a machine with network, save it with AutoModel.from_pretrained({repo_id!r}).save_pretrained(DIR) "
            f"(and its tokenizer) and {use}")


def require_hub_id_available(repo_id: str, *, repo_type: str = "model", flag: str = "--model",
                             spec: str | None = None, config: str | None = None) -> bool:
    """Check a hub id before the Hugging Face libraries are asked to load it.

    Returns True when the id must be loaded from the local cache only (cached, and the hub is not reachable or
    the user asked for offline): the caller passes ``local_files_only=True`` / turns the datasets library
    offline. Returns False when the hub is reachable (normal loading). Raises InputError (naming ``spec``, what
    the user typed, default ``repo_id``) at once when the id is neither cached nor reachable."""
    cached = cached_repo_dir(repo_id, repo_type) is not None
    if offline_requested():
        if cached:
            return True
        raise InputError(f"not in the local Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set; "
                         + how_to_proceed(repo_id, repo_type, flag, config), spec or repo_id)
    if hub_reachable():
        return False
    if cached:
        return True
    host, port = _probe_target()
    raise InputError(f"not in the local Hugging Face cache ({hub_cache_dir()}) and the hub ({host}:{port}) "
                     f"is not reachable; " + how_to_proceed(repo_id, repo_type, flag, config), spec or repo_id)


def force_offline() -> None:
    """Make the Hugging Face libraries read their caches only, for the rest of this process (used when the hub
    is unreachable: their retries would otherwise cost a minute). Sets the environment for modules not yet
    imported and the constants of those already imported."""
    import sys

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    dconfig = sys.modules.get("datasets.config")
    if dconfig is not None:
        dconfig.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
        if hasattr(dconfig, "HF_DATASETS_OFFLINE"):
            dconfig.HF_DATASETS_OFFLINE = True  # type: ignore[attr-defined]
