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

import io
import posixpath
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import tensorflow_datasets as tfds

HERE = Path(__file__).resolve().parent
ROOT = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Published by the dataset's hosts: size and md5 only (no sha256 exists publicly; see checksums.tsv).
OFFICIAL_ZIP = {"size": 248_100_043, "md5": "90528d7ca1a48142e341f4ef8d21d0de"}
TAR_NAMES = ("tiny-imagenet-200_train.tar.gz", "tiny-imagenet-200_meta_val.tar.gz")

Reader = Callable[[], bytes]


class SourceError(ValueError):
    """The manual_dir content is missing, partial or unsafe; names the offending path."""


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
    """(relative image path, wnid) per split; every structural check happens here, before writing."""
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


def rgb_bytes(content: bytes, name: str) -> bytes:
    """The JPEG itself if it is a 64x64 RGB image; grayscale ones as RGB PNG. Decodes to verify."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            if image.size != (64, 64):
                raise SourceError(f"{name}: image is {image.size[0]}x{image.size[1]}, not 64x64.")
            if image.mode == "RGB":
                return content
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SourceError(f"{name}: not a decodable JPEG ({err}); the dataset copy is "
                          "damaged.") from None


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
        wnids = (HERE / "labels.txt").read_text().split()
        splits = index(files, where, wnids)
        return {name: self._generate_examples(files, items) for name, items in splits.items()}

    def _generate_examples(self, files: dict[str, Reader], items: list[tuple[str, str]]
                           ) -> Iterator[tuple[str, dict]]:
        for rel, wnid in items:
            name = posixpath.basename(rel)
            yield name, {"image": rgb_bytes(files[rel](), f"{ROOT}/{rel}"), "label": wnid,
                         "file_name": name}


def verify_zip(path: Path) -> None:
    """Check the official zip against its published size and md5 (no sha256 is published)."""
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


def class_names() -> list[str]:
    """Human-readable names (words.txt) in label order."""
    return (HERE / "class_names.txt").read_text().splitlines()


