"""Fixtures for the end-to-end reliability suite (tests/agents and tests/hub fixtures are not visible here;
`make_hub` is in tests/conftest.py)."""

from pathlib import Path

import pytest
from helpers import compile_bundle
from hub_helpers import signing_keys


@pytest.fixture(scope="session")
def cnn_bundles(
    small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The small generated CNN as cnn 1.0.0 and 2.0.0, signed by one key; and that key's public half."""
    folder = tmp_path_factory.mktemp("reliability-bundles")
    key, public = signing_keys(folder / "key")

    def build(version: str) -> Path:
        return compile_bundle(small_cnn_model, small_cnn_calibration, key, version, folder / f"cnn-{version}.ekb",
                              name="cnn")  # fmt: skip

    return {"public": public, "v1": build("1.0.0"), "v2": build("2.0.0")}
