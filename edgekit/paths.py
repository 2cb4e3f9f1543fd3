"""Where edgekit keeps per-user state (default signing key, caches); EDGEKIT_HOME overrides it."""

import os
from pathlib import Path

import platformdirs


def edgekit_home() -> Path:
    override = os.environ.get("EDGEKIT_HOME")
    return Path(override) if override else Path(platformdirs.user_data_dir("edgekit"))


def edgekit_cache() -> Path:
    """Rebuildable data such as TVM tuning databases; under EDGEKIT_HOME when that is set."""
    override = os.environ.get("EDGEKIT_HOME")
    return Path(override) / "cache" if override else Path(platformdirs.user_cache_dir("edgekit"))
