from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that run an external binary say so with @pytest.mark.needs("h2load").
    # On a developer's machine a missing binary skips the test; in CI (CI set)
    # the test runs anyway and fails, so a missing install step cannot hide.
    if os.environ.get("CI"):
        return
    for item in items:
        for mark in item.iter_markers("needs"):
            for tool in mark.args:
                if shutil.which(tool) is None:
                    item.add_marker(pytest.mark.skip(reason=f"{tool} is not installed"))
