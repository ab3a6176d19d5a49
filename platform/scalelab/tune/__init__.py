"""Hyperparameter search with Ray Tune: search space, searchers, trial functions, driver, reports."""
