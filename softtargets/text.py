"""Words in messages: counts with their nouns in the right number."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``"1 shard"``, ``"3 shards"``, ``"0 shards"``; ``nouns`` where adding "s" is wrong (``"entries"``).

    Args:
        n: the count.
        noun: the singular.
        nouns: the plural (default ``noun + "s"``).
    """
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
