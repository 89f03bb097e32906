"""Tiny ImageNet: the official files (`source`, no TensorFlow) and our tfds builder.

Importing `tiny_imagenet_dataset_builder` (or reading `Builder` from this package) registers the
`tiny_imagenet` tfds builder; importing the package alone does not pull in TensorFlow, so the
TensorFlow-free reader can use `source` on machines without it.
"""

from jaxbench.datasets.tiny_imagenet.source import SourceError

__all__ = ["Builder", "SourceError"]


def __getattr__(name):
    if name == "Builder":
        from jaxbench.datasets.tiny_imagenet.tiny_imagenet_dataset_builder import Builder

        return Builder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
