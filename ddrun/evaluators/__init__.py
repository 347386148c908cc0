"""Evaluators (``conf/evaluator/``): train fresh networks only on S and test them on the real test split
(contract: ``ddrun.contracts.Evaluator``)."""

from ddrun.evaluators.default import CrossArchEvaluator, Evaluator

__all__ = ["Evaluator", "CrossArchEvaluator"]
