"""Real data: torchvision datasets as normalized tensors, per-class sampling, DSA augmentation."""

from ddrun.data.datasets import RealData

__all__ = ["RealData"]
