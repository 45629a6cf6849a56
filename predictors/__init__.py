"""Predictors of the next transfers (installed as ``pipellm.predictors``)."""
