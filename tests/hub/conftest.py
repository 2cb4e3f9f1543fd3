"""Hub fixtures: `make_hub` (tests/conftest.py) and a default hub from it."""

import pytest

from edgekit.hub.service import Hub


@pytest.fixture
def hub(make_hub) -> Hub:
    return make_hub()
