"""Distillation objectives: ``objective(syn, real, net, it, generator) -> scalar loss``."""
