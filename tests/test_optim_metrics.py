"""Study metrics (stagetune.optim.metrics): what a trial's value is."""

from __future__ import annotations

import math

from stagetune.optim.metrics import DEFAULT_METRIC, LEGACY_METRIC, METRICS, TIE_BREAK


def test_error_and_loss_are_the_figures_themselves() -> None:
    assert METRICS["error"].value(0.25, 3.0) == 0.25
    assert METRICS["loss"].value(0.25, 3.0) == 3.0
    assert METRICS["loss"].value(0.25, math.nan) == math.inf  # a diverged model ranks last
    assert DEFAULT_METRIC in METRICS and LEGACY_METRIC == "error"


def test_error_plus_loss_orders_by_error_then_by_loss() -> None:
    value = METRICS["error+loss"].value
    losses = [0.0, 0.01, 0.7, 1.0, 3.0, 50.0, 1e6, math.inf, math.nan]
    errors = [0.0, 1e-5, 0.3, 1.0, 1.00001, 1.7]  # steps of one error in 100,000 units
    pairs = [(e, i) for e in errors for i in range(len(losses))]
    ranked = sorted(pairs, key=lambda p: value(p[0], losses[p[1]]))
    # Lexicographic: error first, the loss (NaN and infinity last) only among equal errors.
    assert ranked == sorted(ranked, key=lambda p: (p[0], p[1]))
    finite = losses[:-2]
    assert len({value(e, loss) for e in errors for loss in finite}) == len(errors) * len(finite)
    assert all(0 <= value(e, loss) - e <= TIE_BREAK * (1 + 1e-9) for e in errors for loss in losses)
