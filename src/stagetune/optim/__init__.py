"""Everything that touches optuna: the study database, samplers, pruners, workers.

Submodules import optuna at module level, so import them only inside CLI
commands (``stagetune --help`` must not pay for optuna); only
:mod:`stagetune.optim.metrics`, whose names the CLI's help lists, imports
nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
