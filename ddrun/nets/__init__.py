"""Networks used for distillation and evaluation."""

from ddrun.nets.alexnet import AlexNet
from ddrun.nets.convnet import ConvNet
from ddrun.nets.lenet import LeNet
from ddrun.nets.mlp import MLP
from ddrun.nets.resnet import ResNet18
from ddrun.nets.vgg import VGG11

__all__ = ["AlexNet", "ConvNet", "LeNet", "MLP", "ResNet18", "VGG11"]
