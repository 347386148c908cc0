"""Evaluators (``conf/evaluator/``): train fresh networks only on S and test them on the real test split
(contract: ``ddrun.contracts.Evaluator``)."""

from ddrun.evaluators.default import CrossArchEvaluator, Evaluator
from ddrun.evaluators.regression import RegressionEvaluator
from ddrun.evaluators.replay import ReplayEvaluator

__all__ = ["Evaluator", "CrossArchEvaluator", "RegressionEvaluator", "ReplayEvaluator"]
