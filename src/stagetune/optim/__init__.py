"""Everything that touches optuna: the study database, samplers, pruners, workers.

Submodules import optuna at module level, so import them only inside CLI
commands (``stagetune --help`` must not pay for optuna).
"""

from __future__ import annotations

__all__: list[str] = []
