"""Shared fixtures; each fixture family lives in its own plugin module."""

from __future__ import annotations

import pytest

pytest_plugins = ["fixtures_data", "fixtures_db"]

#: Test files that take minutes, started first so that, run on two processes
#: (scripts/test.sh), none of them is left alone at the end.
LONGEST_FIRST = (
    "test_default_config.py",
    "test_optuna_storage_suite.py",
    "test_e2e.py",
    "test_optim_servers.py",
    "test_optim_budget.py",
    "test_plan.py",
    "test_plan_slurm.py",
    "test_db_faults.py",
    "test_packaging.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collection order with :data:`LONGEST_FIRST` files in front (otherwise unchanged)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
