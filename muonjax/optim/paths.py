"""Tree paths as names: the one spelling of a `jax.tree_util` key path that
muonjax routes, groups and looks up leaves by."""

from __future__ import annotations

from typing import Any


def key_name(key: Any) -> str:
    """A path key as a string: a DictKey's key, a GetAttrKey's name, a
    SequenceKey's index (a FlattenedIndexKey's key)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: Any) -> tuple[str, ...]:
    """A tree path's keys as strings, without an nnx.State's trailing "value"
    (the key of a Variable's value): ("layers", "attn", "kernel")."""
    names = [key_name(key) for key in path]
    while names and names[-1] == "value":
        names.pop()
    return tuple(names)
