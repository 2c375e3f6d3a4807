"""vitcnn: a Vision Transformer and a CNN trained from scratch on CIFAR, compared."""

__version__ = "0.1.0"
