"""Networks used for distillation and evaluation."""

from ddrun.nets.convnet import ConvNet

__all__ = ["ConvNet"]
