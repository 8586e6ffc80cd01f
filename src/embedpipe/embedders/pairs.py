"""A (query, document) pair as one string, so pairs travel the embedding path unchanged.

A cross-encoder scores pairs, yet the cache, the single-flight table and the micro-batcher
all handle strings: a pair is written as ``<characters of the query>:<query><document>``.
The length prefix makes the encoding unambiguous (("ab", "c") and ("a", "bc") differ), so
its sha256 is the pair's cache key under the cross-encoder's fingerprint.
"""

from __future__ import annotations


def pair_text(query: str, document: str) -> str:
    """>>> pair_text("ab", "c")
    '2:abc'"""
    return f"{len(query)}:{query}{document}"


def split_pair(text: str) -> tuple[str, str]:
    """The (query, document) of :func:`pair_text`; ValueError for anything else.

    >>> split_pair(pair_text("a:b", "c"))
    ('a:b', 'c')"""
    length, sep, rest = text.partition(":")
    if not sep or not length.isdigit() or int(length) > len(rest):
        raise ValueError("not a (query, document) pair")
    return rest[: int(length)], rest[int(length) :]
