"""Datasets: tfds builders that the tfds catalog lacks, and a TensorFlow-free reader of the
official files (`files`) that reproduces the tfds path's arrays and order (`tfds_order`)."""
