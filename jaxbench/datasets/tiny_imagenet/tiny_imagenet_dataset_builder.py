"""Tiny ImageNet (Stanford CS231n) as a tfds dataset builder.

Works offline from `manual_dir`, which may hold any of:
  * the official `tiny-imagenet-200.zip`,
  * an extracted `tiny-imagenet-200/` folder (or be that folder itself),
  * the two archives `tiny-imagenet-200_train.tar.gz` and `tiny-imagenet-200_meta_val.tar.gz`.
Archives are read member by member in memory; nothing is extracted, and a member whose path
would escape the `tiny-imagenet-200/` folder stops preparation.

Images are stored as the original JPEG bytes, untouched, so nothing is lost to re-encoding and the
prepared dataset is small. The ~2% grayscale JPEGs are converted to RGB and stored as PNG
(lossless from the decoded pixels); `tf.image.decode_image` reads both.

The unlabelled `test` split of the official release is left out: it has no labels to evaluate on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

# Everything that reads the official files lives in `source` (no TensorFlow), shared with the
# TensorFlow-free reader (jaxbench/datasets/files.py).
from jaxbench.datasets.tiny_imagenet.source import (
    HERE, OFFICIAL_ZIP, ROOT, TAR_NAMES, URL, Reader, _zip_files, find_source, index, key,
    rgb_bytes, verify_zip, wnids)


class Builder(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet: 200 classes, 64x64 RGB, 100,000 train and 10,000 validation images."""

    name = "tiny_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train and validation splits; test (unlabelled) "
                              "left out."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download {URL} (248,100,043 bytes, md5 {OFFICIAL_ZIP['md5']}) and place it in manual_dir as
    `{ROOT}.zip`, or extract it there (`manual_dir/{ROOT}/wnids.txt` must exist). The two archives
    {' and '.join(TAR_NAMES)} are accepted as well.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        names = (HERE / "class_names.txt").read_text().splitlines()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names_file=str(HERE / "labels.txt")),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://cs231n.stanford.edu/",
            metadata=tfds.core.MetadataDict(class_names=names),
            description="Tiny ImageNet: 200 ImageNet classes downsampled to 64x64, 500 train and "
                        "50 validation images per class. wnids are the labels; "
                        "`info.metadata['class_names']` holds the words.txt names in label order.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError:  # no manual_dir: fetch the official zip (needs the network)
            zip_path = Path(dl_manager.download(URL))
            verify_zip(zip_path)
            where, files = str(zip_path), _zip_files(zip_path)
        else:
            where, files = find_source(manual_dir)
        splits = index(files, where, wnids())
        return {name: self._generate_examples(files, items) for name, items in splits.items()}

    def _generate_examples(self, files: dict[str, Reader], items: list[tuple[str, str]]
                           ) -> Iterator[tuple[str, dict]]:
        for rel, wnid in items:
            name = key(rel)  # the file name; tfds orders the split by a hash of it
            yield name, {"image": rgb_bytes(files[rel](), f"{ROOT}/{rel}"), "label": wnid,
                         "file_name": name}

