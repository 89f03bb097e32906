"""Tiny ImageNet's official files: locating, listing, checking and decoding them. No TensorFlow.

The tfds builder (`tiny_imagenet_dataset_builder.py`) and the TensorFlow-free reader
(`jaxbench/datasets/files.py`) both use this module, so both see the same files, the same
structural checks and the same labels.

`manual_dir` may hold any of:
  * the official `tiny-imagenet-200.zip`,
  * an extracted `tiny-imagenet-200/` folder (or be that folder itself),
  * the two archives `tiny-imagenet-200_train.tar.gz` and `tiny-imagenet-200_meta_val.tar.gz`.
Archives are read member by member in memory; nothing is extracted, and a member whose path
would escape the `tiny-imagenet-200/` folder stops everything.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Published by the dataset's hosts: size and md5. The sha256 that tfds checks on download is in
# checksums.tsv (see the README for where it comes from).
OFFICIAL_ZIP = {"size": 248_100_043, "md5": "90528d7ca1a48142e341f4ef8d21d0de"}
TAR_NAMES = ("tiny-imagenet-200_train.tar.gz", "tiny-imagenet-200_meta_val.tar.gz")
SPLITS = ("train", "validation")

Reader = Callable[[], bytes]


class SourceError(ValueError):
    """The manual_dir content is missing, partial or unsafe; names the offending path."""


def wnids() -> list[str]:
    """The 200 class ids in label order (the official wnids.txt order)."""
    return (HERE / "labels.txt").read_text().split()


def class_names() -> list[str]:
    """Human-readable names (words.txt) in label order."""
    return (HERE / "class_names.txt").read_text().splitlines()


def _safe_relpath(member: str, archive: Path) -> str | None:
    """Path of `member` inside tiny-imagenet-200/, or None for entries outside it.

    Rejects absolute paths and any `..` that would leave the folder (zip-slip / tar-slip).
    """
    name = member.replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
        raise SourceError(f"{archive}: member {member!r} has a path escaping its folder; "
                          "refusing this archive (re-download the official one).")
    head, _, rest = posixpath.normpath(name).partition("/")
    if head != ROOT or not rest:
        return None
    return rest


def _zip_files(path: Path) -> dict[str, Reader]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise SourceError(f"{path}: not a readable zip archive ({err}); re-download it.") from None
    files = {}
    for info in archive.infolist():
        rel = _safe_relpath(info.filename, path)
        if rel is not None and not info.is_dir():
            files[rel] = lambda name=info.filename: archive.read(name)
    return files


def _tar_files(paths: list[Path]) -> dict[str, Reader]:
    files = {}
    for path in paths:
        try:
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:
                    rel = _safe_relpath(member.name, path)
                    if member.issym() or member.islnk():
                        raise SourceError(f"{path}: member {member.name!r} is a link; refusing it.")
                    if rel is not None and member.isfile():
                        content = archive.extractfile(member).read()
                        files[rel] = lambda content=content: content
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SourceError(f"{path}: not a readable tar.gz archive ({err}); re-download "
                              "it.") from None
    return files


def _folder_files(root: Path) -> dict[str, Reader]:
    return {p.relative_to(root).as_posix(): p.read_bytes
            for p in root.rglob("*") if p.is_file()}


def locate(manual_dir: Path) -> tuple[str, Path | list[Path]]:
    """Which form of the dataset manual_dir holds: ("folder" | "zip" | "tar", path(s)). Reads nothing."""
    if (manual_dir / "wnids.txt").is_file():
        return "folder", manual_dir
    if (manual_dir / ROOT).is_dir():
        return "folder", manual_dir / ROOT
    if (manual_dir / f"{ROOT}.zip").is_file():
        return "zip", manual_dir / f"{ROOT}.zip"
    tars = [manual_dir / name for name in TAR_NAMES]
    if all(p.is_file() for p in tars):
        return "tar", tars
    raise SourceError(f"manual_dir {manual_dir} holds no Tiny ImageNet: expected {ROOT}.zip, an "
                      f"extracted {ROOT}/ folder (with wnids.txt), or {' + '.join(TAR_NAMES)}.")


def identity(manual_dir: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file the dataset is read from; reads no content.

    Names are relative to the source (archive base names, or paths inside the folder), so the
    same files at another path have the same identity.
    """
    kind, where = locate(manual_dir)
    if kind == "folder":
        paths = sorted(p for p in where.rglob("*") if p.is_file())
        names = [p.relative_to(where).as_posix() for p in paths]
    else:
        paths = [where] if kind == "zip" else list(where)
        names = [p.name for p in paths]
    out = []
    for name, path in zip(names, paths):
        st = path.stat()
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def find_source(manual_dir: Path) -> tuple[str, dict[str, Reader]]:
    """Locate the dataset in manual_dir; return a description and {relative path: reader}."""
    kind, where = locate(manual_dir)
    if kind == "folder":
        return str(where), _folder_files(where)
    if kind == "zip":
        files = _zip_files(where)  # unsafe member paths first: the most telling refusal
        verify_zip(where)
        return str(where), files
    return ", ".join(map(str, where)), _tar_files(where)


def _lines(files: dict[str, Reader], rel: str, where: str) -> list[str]:
    if rel not in files:
        raise SourceError(f"{where}: {ROOT}/{rel} is missing; the dataset is incomplete.")
    return files[rel]().decode("utf-8").splitlines()


def index(files: dict[str, Reader], where: str, wnids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(relative image path, wnid) per split, in generation order; every structural check is here."""
    found = [w for w in _lines(files, "wnids.txt", where) if w.strip()]
    if found != wnids:
        raise SourceError(f"{where}: {ROOT}/wnids.txt does not list the 200 Tiny ImageNet classes "
                          f"in the official order ({len(found)} ids found).")
    train = []
    for wnid in wnids:
        prefix = f"train/{wnid}/images/"
        images = sorted(r for r in files if r.startswith(prefix) and r.endswith(".JPEG"))
        if not images:
            raise SourceError(f"{where}: {ROOT}/{prefix} is missing or empty; the train split "
                              "is incomplete.")
        train.extend((r, wnid) for r in images)
    known = set(wnids)
    val = []
    annotations = "val/val_annotations.txt"
    for number, line in enumerate(_lines(files, annotations, where), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in known:
            raise SourceError(f"{where}: {ROOT}/{annotations} line {number} names an unknown wnid "
                              f"({line.strip()!r}).")
        rel = f"val/images/{fields[0]}"
        if rel not in files:
            raise SourceError(f"{where}: {ROOT}/{rel}, listed in {annotations}, is missing.")
        val.append((rel, fields[1]))
    return {"train": train, "validation": val}


def key(rel: str) -> str:
    """The example key the builder yields for an image (its file name): tfds shuffles by it."""
    return posixpath.basename(rel)


def _open(content: bytes, name: str):
    """The decoded PIL image, checked to be 64x64; SourceError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(content))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SourceError(f"{name}: not a decodable JPEG ({err}); the dataset copy is "
                          "damaged.") from None
    if image.size != (64, 64):
        raise SourceError(f"{name}: image is {image.size[0]}x{image.size[1]}, not 64x64.")
    return image


def _png(image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def rgb_bytes(content: bytes, name: str) -> bytes:
    """The JPEG itself if it is a 64x64 RGB image; grayscale ones as RGB PNG. Decodes to verify."""
    image = _open(content, name)
    return content if image.mode == "RGB" else _png(image)


def decode(content: bytes, name: str) -> tuple[np.ndarray, int]:
    """(64x64x3 uint8 pixels, length of the bytes the builder stores for this image).

    The pixels are PIL's decoding; grayscale images are converted to RGB exactly as `rgb_bytes`
    does before it stores them as PNG (so for those, tfds and this function give equal pixels).
    The stored length lets the reader compute the serialized split size, which decides how
    many shards tfds writes.
    """
    image = _open(content, name)
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8), len(content)
    rgb = image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8), len(_png(rgb))


def verify_zip(path: Path) -> None:
    """Check the official zip against its published size and md5."""
    import hashlib

    size = path.stat().st_size
    if size != OFFICIAL_ZIP["size"]:
        raise SourceError(f"{path}: {size:,} bytes, the official zip has {OFFICIAL_ZIP['size']:,}; it is "
                          "truncated or not the official file. Re-download it.")
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != OFFICIAL_ZIP["md5"]:
        raise SourceError(f"{path}: md5 {digest.hexdigest()} differs from the official "
                          f"{OFFICIAL_ZIP['md5']}; the file is damaged. Re-download it.")
