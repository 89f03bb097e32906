"""Importing this package registers the `tiny_imagenet` tfds builder."""

from jaxbench.datasets.tiny_imagenet.tiny_imagenet_dataset_builder import Builder, SourceError

__all__ = ["Builder", "SourceError"]
