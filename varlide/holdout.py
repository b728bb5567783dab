"""The one held-out rule: which images of a corpus a model is never trained on.

An image is held out when its content hash, ``int(sha256(bytes)[:8], 16) / 2**32``, is below
``fraction``, and it is among the ``limit`` lowest such hashes of the corpus. Content, not
names: renaming or reordering files does not move an image across the split, and the same
photograph in two folders lands on the same side. The trainer validates on exactly this set
(``varlide.training``), and ``varlide eval``'s default sets, the retrain gate and the
benchmarks evaluate on it, so no evaluated image was trained on.

The defaults are the ones the shipped weights were trained with (their ``config.json``
records the rule and the counts under ``training.split``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

FRACTION = 0.05
LIMIT = 48
RULE = "sha256(bytes)[:8] / 2^32 < {fraction:g}, at most {limit}"


def content_fraction(sha256_hex: str) -> float:
    """A content hash (hex) as a uniform number in [0, 1)."""
    return int(sha256_hex[:8], 16) / 2**32


def split(items: Sequence[T], digest: Callable[[T], str], fraction: float = FRACTION,
          limit: int | None = LIMIT) -> tuple[list[T], list[T]]:
    """``(train, held_out)``: ``train`` in input order, ``held_out`` by ascending hash.
    ``digest`` gives an item's sha256 (hex) of its bytes."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction: expected a value in [0, 1), got {fraction}")
    held = sorted((it for it in items if content_fraction(digest(it)) < fraction), key=digest)
    held = held[:limit] if limit is not None else held
    chosen = {id(it) for it in held}
    return [it for it in items if id(it) not in chosen], held


def split_corpus(corpus_uri: str, fraction: float = FRACTION, limit: int | None = LIMIT,
                 max_images: int | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` relative paths of a corpus (``max_images``: its first N, as the
    trainer reads it); every file is read once to hash it."""
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import filesystem, join

    files = [f.rel_path for f in list_corpus(corpus_uri, limit=max_images)]

    def sha(rel: str) -> str:
        fs, path = filesystem(join(corpus_uri, rel))
        return hashlib.sha256(fs.cat_file(path)).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        digests = dict(zip(files, pool.map(sha, files), strict=True))
    train, held = split(files, digests.__getitem__, fraction, limit)
    return train, held


def describe(fraction: float = FRACTION, limit: int | None = LIMIT) -> str:
    """The rule as recorded in a trained model's ``config.json``."""
    return RULE.format(fraction=fraction, limit=limit)
