"""Fixtures shared by the planner tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def write_yaml(tmp_path):
    """Write a mapping to tmp_path/name as YAML and return the path as a string."""
    import yaml

    def write(name: str, data: dict) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write
