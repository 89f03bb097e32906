"""The order in which tfds yields a prepared split, computed without TensorFlow.

What tfds (4.9.x; checked against 4.9.10) does, and what this module mirrors step by step:

1. `download_and_prepare` shuffles every split by key: each example's key (what the builder's
   `_generate_examples` yields first) is hashed as md5(split name + key) read as a 128-bit
   integer (`tensorflow_datasets/core/hashing.py`; int keys hash as their decimal string), and
   the examples are written in ascending hash order (`core/shuffle.py`). Not a random shuffle:
   the same keys always give the same order.
2. The sorted examples are cut into shards (`core/writer.py`, `core/utils/shard_utils.py`): the
   shard count follows from the split's serialized size (sum of the tf.train.Example byte
   lengths, plus 16 bytes per example), between 64 MiB and 1 GiB per shard; the boundaries are
   `round(n * i / shards)`. (A DownloadConfig's min/max shard sizes do not change this in tfds
   4.9.10: `calculate_number_shards` is a classmethod reading the class defaults. Only
   `num_shards` does; the tests use it to force several shards.)
3. `as_dataset(split="train[:N]", shuffle_files=False)` takes the first N examples of the
   concatenated shards and reads the shards through `tf.data.Dataset.interleave` with
   `cycle_length=16, block_length=16` (tfds' defaults for a shuffled dataset, pinned in
   `jaxbench.data.load_split`): 16 examples from shard 0, 16 from shard 1, ..., round robin.
   With one shard that is simply the hash order; Tiny ImageNet's train split has two.

`tests/test_reader_tiny.py` checks each step against tfds itself (hashes, serialized sizes,
shard counts and, with shards forced small, the interleaved read order).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

MIN_SHARD_SIZE = 64 << 20  # tfds' shard_utils.DEFAULT_MIN_SHARD_SIZE
MAX_SHARD_SIZE = 1024 << 20  # DEFAULT_MAX_SHARD_SIZE
RECORD_OVERHEAD = 16  # ShardConfig.overhead: TFRecord framing per example
CYCLE_LENGTH = 16  # ReadConfig interleave_cycle_length for shuffled datasets
BLOCK_LENGTH = 16  # ReadConfig.interleave_block_length


def _key_bytes(key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, int):
        key = str(key)
    return key.replace("\\", "/").encode("utf-8")


def hash_order(split: str, keys: Sequence) -> np.ndarray:
    """Indices into `keys` in the order tfds writes the split: ascending md5(split + key)."""
    salted = hashlib.md5(_key_bytes(split))
    hashes = []
    for k in keys:
        md5 = salted.copy()
        md5.update(_key_bytes(k))
        hashes.append(int(md5.hexdigest(), 16))
    order = sorted(range(len(keys)), key=hashes.__getitem__)
    for a, b in zip(order, order[1:]):
        if hashes[a] == hashes[b]:
            raise ValueError(f"two examples of split {split!r} share the key {keys[a]!r}; "
                             "tfds refuses such a dataset.")
    return np.asarray(order, dtype=np.int64)


def num_shards(total_size: int, num_examples: int, min_shard_size: int = MIN_SHARD_SIZE,
               max_shard_size: int = MAX_SHARD_SIZE, overhead: int = RECORD_OVERHEAD) -> int:
    """tfds' ShardConfig.calculate_number_shards (precise sharding, the single-process writer)."""
    total_size += num_examples * overhead
    max_shards = total_size // min_shard_size
    min_shards = total_size // max_shard_size
    if min_shards <= 1024 <= max_shards and num_examples >= 1024:
        return 1024
    if min_shards > 1024:
        i = 2
        while True:
            n = 1024 * i
            if n >= min_shards and num_examples >= n:
                return n
            if n > num_examples:  # tfds would loop forever here
                raise ValueError(f"{num_examples} examples of {total_size} bytes cannot be sharded")
            i += 1
    for n in (512, 256, 128, 64, 32, 16, 8, 4, 2):
        if min_shards <= n <= max_shards and num_examples >= n:
            return n
    return 1


def shard_lengths(num_examples: int, shards: int) -> list[int]:
    """Examples per shard: tfds' get_shard_boundaries (Python's round, ties to even)."""
    bounds = [round(num_examples * i / shards) for i in range(1, shards + 1)]
    return [b - a for a, b in zip([0, *bounds], bounds)]


def interleave(parts: Sequence[np.ndarray], cycle_length: int = CYCLE_LENGTH,
               block_length: int = BLOCK_LENGTH) -> np.ndarray:
    """The element order of `tf.data.Dataset.from_tensor_slices(parts).interleave(...)`.

    Follows tf.data's (deterministic) interleave: `cycle_length` slots opened in turn, up to
    `block_length` elements from a slot before moving to the next, an exhausted input frees its
    slot (noticed when the slot is next asked, after a full block), a free slot takes the next
    input when the cycle reaches it.
    """
    slots: list[list | None] = [None] * cycle_length
    next_input, cycle, out = 0, 0, []
    while next_input < len(parts) or any(s is not None for s in slots):
        slot = slots[cycle]
        if slot is None:
            if next_input < len(parts):
                slots[cycle] = [parts[next_input], 0]
                next_input += 1
            else:
                cycle = (cycle + 1) % cycle_length
            continue
        part, pos = slot
        if pos == len(part):  # end of this input: free the slot, go on with the next one
            slots[cycle] = None
            cycle = (cycle + 1) % cycle_length
            continue
        take = min(block_length, len(part) - pos)
        out.append(part[pos:pos + take])
        slot[1] = pos + take
        if take == block_length:
            cycle = (cycle + 1) % cycle_length
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def read_order(sorted_index: np.ndarray, lengths: Sequence[int], limit: int | None = None,
               cycle_length: int = CYCLE_LENGTH, block_length: int = BLOCK_LENGTH) -> np.ndarray:
    """What `as_dataset(split[:limit])` yields, as entries of `sorted_index` (the write order).

    The slice is taken over the concatenated shards first (tfds' file instructions), then the
    shards that contribute are interleaved.
    """
    stop = len(sorted_index) if limit is None else min(limit, len(sorted_index))
    parts, start = [], 0
    for length in lengths:
        end = min(start + length, stop)
        if end > start:
            parts.append(sorted_index[start:end])
        start += length
    return interleave(parts, cycle_length, block_length)


# -- serialized size of a tf.train.Example (protobuf wire format), to count shards ---------------

def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_len(payload: int) -> int:
    """A length-delimited field with a one-byte tag (field numbers below 16)."""
    return 1 + _varint_len(payload) + payload


def example_size(features: dict[str, tuple[str, int]]) -> int:
    """Bytes of a serialized tf.train.Example holding one value per feature.

    `features` maps a feature name to ("bytes", length of the value) or ("int64", the value),
    e.g. {"image": ("bytes", 2345), "label": ("int64", 17), "file_name": ("bytes", 14)}.
    """
    entries = 0
    for name, (kind, value) in features.items():
        if kind == "bytes":
            inner = _field_len(value)  # BytesList.value
        elif kind == "int64":
            if value < 0:
                raise ValueError("negative int64 values are not supported")
            inner = _field_len(_varint_len(value))  # Int64List.value, packed
        else:
            raise ValueError(f"unknown feature kind {kind!r}")
        feature = _field_len(inner)  # a Feature: its bytes_list / int64_list field
        entry = _field_len(len(name.encode("utf-8"))) + _field_len(feature)  # map entry: key, value
        entries += _field_len(entry)  # Features.feature
    return _field_len(entries)  # Example.features


def split_read_order(split: str, keys: Sequence, sizes: Iterable[int] | None,
                     limit: int | None = None, shards: int | None = None) -> np.ndarray:
    """Indices into `keys` in the order tfds' `as_dataset(split[:limit])` yields them.

    `sizes` are the serialized example sizes (for the shard count); pass `shards` instead when
    the count is known (or forced, as DownloadConfig(num_shards=...) does).
    """
    if limit is not None and not 0 <= limit <= len(keys):
        raise ValueError(f"Requested slice [:{limit}] incompatible with {len(keys)} examples.")
    order = hash_order(split, keys)
    if shards is None:
        shards = num_shards(int(sum(sizes)), len(keys))
    return read_order(order, shard_lengths(len(keys), shards), limit)
