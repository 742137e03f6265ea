"""Named samplers, pruners and importance evaluators (CLI choices are ``sorted(REGISTRY)``)."""

from __future__ import annotations

from typing import Callable

import optuna

__all__ = ["SAMPLERS", "PRUNERS", "EVALUATORS", "make_sampler", "make_pruner", "make_evaluator"]

SAMPLERS: dict[str, Callable[[int | None], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=seed
    ),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "nsgaii": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
}

#: Factories take the maximum number of epochs (the pruning resource).
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "hyperband": lambda max_epochs: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3
    ),
    "median": lambda max_epochs: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    "successive-halving": lambda max_epochs: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=3
    ),
    "none": lambda max_epochs: optuna.pruners.NopPruner(),
}

EVALUATORS: dict[str, Callable[[int], optuna.importance.BaseImportanceEvaluator]] = {
    "ped-anova": lambda seed: optuna.importance.PedAnovaImportanceEvaluator(),
    "fanova": lambda seed: optuna.importance.FanovaImportanceEvaluator(seed=seed),
    "mdi": lambda seed: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed),
}


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler registered as ``name`` (its optional package checked first: one line naming the extra)."""
    from stagetune.extras import require_sampler

    require_sampler(name)
    return SAMPLERS[name](seed)


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner registered as ``name``."""
    return PRUNERS[name](max_epochs)


def make_evaluator(name: str, seed: int) -> optuna.importance.BaseImportanceEvaluator:
    """The importance evaluator registered as ``name`` (its optional package checked first)."""
    from stagetune.extras import require_evaluator

    require_evaluator(name)
    return EVALUATORS[name](seed)
