"""wandb's mode for a run or a report, its environment, and the check that online logging can
work, made before anything is logged. No torch (reports use it too)."""

from __future__ import annotations

import contextlib
import os

from .config import WANDB_MODES
from .errors import ConfigError

_WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # older WANDB_MODE spellings


def wandb_mode(flag: str | None) -> str:
    """The wandb mode: the flag, else ``$WANDB_MODE``, else offline; ConfigError if unknown."""
    mode = flag or os.environ.get("WANDB_MODE") or "offline"
    mode = _WANDB_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ConfigError(f"unknown wandb mode '{mode}'; choose from {', '.join(WANDB_MODES)}")
    return mode


def report_wandb_mode(flag: str) -> str:
    """A report's ``--wandb``: offline or online (a report logs to wandb only when asked)."""
    if flag not in ("offline", "online"):
        raise ConfigError(f"a report's --wandb is offline or online, got '{flag}'")
    return flag


@contextlib.contextmanager
def environ(**values: str):
    """Set environment variables for the duration of a block (wandb reads its settings there)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_wandb_online() -> None:
    """Fail fast, before any training, when online logging cannot work: no API key, or the
    server does not answer within 5 s."""
    import socket
    from urllib.parse import urlparse

    import wandb

    # The flag wins over a WANDB_MODE that would make wandb skip the check; no chatter.
    with environ(WANDB_MODE="online", WANDB_SILENT="true"):
        has_key = wandb.login(prompt=False, verify=False)
        url = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    if not has_key:
        raise ConfigError("wandb online needs an API key: run `wandb login` (or set "
                          "WANDB_API_KEY), or use --wandb offline and `wandb sync` later")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"wandb online: cannot reach {url.geturl()} ({exc}); use --wandb "
                          f"offline and `wandb sync` later") from None
