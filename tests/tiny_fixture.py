"""A miniature Tiny ImageNet in the official layout: all 200 wnids, a few JPEGs per class."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from jaxbench.datasets.tiny_imagenet import source as tin  # no TensorFlow: usable by the reader tests

WNIDS = (tin.HERE / "labels.txt").read_text().split()
GRAY_TRAIN = f"train/{WNIDS[3]}/images/{WNIDS[3]}_0.JPEG"  # the one grayscale image


def jpeg(rng, gray=False) -> bytes:
    shape = (64, 64) if gray else (64, 64, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L" if gray else "RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def files(train_per_class: int = 2, val_per_class: int = 1, seed: int = 0) -> dict[str, bytes]:
    """{path relative to tiny-imagenet-200/: bytes}"""
    rng = np.random.default_rng(seed)
    out = {"wnids.txt": "".join(f"{w}\n" for w in WNIDS).encode(),
           "words.txt": "".join(f"{w}\tclass {i}\n" for i, w in enumerate(WNIDS)).encode()}
    annotations = []
    for w in WNIDS:
        boxes = []
        for i in range(train_per_class):
            rel = f"train/{w}/images/{w}_{i}.JPEG"
            out[rel] = jpeg(rng, gray=rel == GRAY_TRAIN)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        out[f"train/{w}/{w}_boxes.txt"] = "".join(boxes).encode()
    for i in range(val_per_class * len(WNIDS)):
        w = WNIDS[(i * 7) % len(WNIDS)]  # labels not in file order
        out[f"val/images/val_{i}.JPEG"] = jpeg(rng)
        annotations.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
    out["val/val_annotations.txt"] = "".join(annotations).encode()
    return out


def write_folder(root: Path, content: dict[str, bytes]) -> Path:
    for rel, data in content.items():
        path = root / tin.ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(root: Path, content: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{tin.ROOT}.zip"
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in content.items():
            z.writestr(f"{tin.ROOT}/{rel}", data)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def write_tars(root: Path, content: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in tin.TAR_NAMES:
        with tarfile.open(root / name, "w:gz") as t:
            for rel, data in content.items():
                if rel.startswith("train/") == name.endswith("_train.tar.gz"):
                    info = tarfile.TarInfo(f"{tin.ROOT}/{rel}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return root


# A tree with one thing wrong, and the message both Tiny ImageNet readers (the tfds builder and the
# TensorFlow-free one) must stop with.
BROKEN = {
    "no wnids": "tiny-imagenet-200/wnids.txt is missing",
    "class missing": f"tiny-imagenet-200/train/{WNIDS[5]}/images/ is missing or empty",
    "no annotations": "tiny-imagenet-200/val/val_annotations.txt is missing",
    "unknown wnid": "val_annotations.txt line 201 names an unknown wnid",
    "bad jpeg": f"tiny-imagenet-200/train/{WNIDS[7]}/images/{WNIDS[7]}_1.JPEG: not a decodable",
}


def broken(kind: str) -> dict[str, bytes]:
    """`files()` with the defect `kind` (a key of `BROKEN`)."""
    content = files()
    if kind == "no wnids":
        del content["wnids.txt"]
    elif kind == "class missing":
        content = {k: v for k, v in content.items() if not k.startswith(f"train/{WNIDS[5]}/")}
    elif kind == "no annotations":
        del content["val/val_annotations.txt"]
    elif kind == "unknown wnid":
        content["val/val_annotations.txt"] += b"val_0.JPEG\tn00000000\t0\t0\t1\t1\n"
    elif kind == "bad jpeg":
        content[f"train/{WNIDS[7]}/images/{WNIDS[7]}_1.JPEG"] = b"\xff\xd8not a jpeg"
    else:
        raise ValueError(kind)
    return content
