"""Shared fixtures; each fixture family lives in its own plugin module."""

pytest_plugins = ["fixtures_data", "fixtures_db"]
