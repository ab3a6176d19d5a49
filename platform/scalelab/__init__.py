"""scalelab: multi-scale ResNet experiment platform."""

__version__ = "0.1.0"
