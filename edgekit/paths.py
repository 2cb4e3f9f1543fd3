"""Where edgekit keeps per-user state (default signing key, caches); EDGEKIT_HOME overrides it."""

import os
from pathlib import Path

import platformdirs


def edgekit_home() -> Path:
    override = os.environ.get("EDGEKIT_HOME")
    return Path(override) if override else Path(platformdirs.user_data_dir("edgekit"))
