"""Which files the "python" corpus (--corpus python; read by corpus.py) holds
after the standard library's source: the Python source of every distribution installed
in this environment's site-packages, which every machine with muonjax installed
has and can rebuild from the same package versions (~111M byte tokens in the
project's environment; see docs/training.md).

Each distribution's `.py` files as its RECORD lists them (files no distribution
claims are not read), distributions sorted by name and files by their path
relative to the site directory, so neither the filesystem's listing order nor
the machine's paths change it. Left out: muonjax's own source (it changes with
every edit, a corpus must not), setuptools' editable-install finders (they name
this machine's paths), `__pycache__`, and files that are not UTF-8 text or hold
a NUL byte (corpus.py skips those as it reads). Test folders are kept: unlike the standard library's, whose test
suite holds deliberately mis-encoded files, they are ordinary source (the check
per file refuses any that is not text), and they are what carries the corpus
past 100M tokens (~16M bytes of them: scipy, numpy, matplotlib). The summary
names each distribution read with its version."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import sysconfig

# distributions never read (canonical names): this project's own source changes
# with every edit
SKIP_DISTRIBUTIONS = frozenset({"muonjax"})
SKIP_PARTS = frozenset({"__pycache__"})
# setuptools' editable-install finders: generated, with this machine's absolute paths
_GENERATED = re.compile(r"__editable__.*\.py")


def site_dirs() -> tuple[pathlib.Path, ...]:
    """This environment's purelib and platlib folders, once each, in that order."""
    paths = sysconfig.get_paths()
    roots = [pathlib.Path(paths[k]).resolve() for k in ("purelib", "platlib")]
    return tuple(r for i, r in enumerate(roots) if r.is_dir() and r not in roots[:i])


def canonical_name(name: str) -> str:
    """A distribution's name as PEP 503 normalizes it: 'PyYAML' -> 'pyyaml'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_files(
    roots: tuple[pathlib.Path, ...],
) -> list[tuple[str, str, list[tuple[str, pathlib.Path]]]]:
    """[(name, version, [(path relative to its site folder, path), ...]), ...]: the
    distributions in `roots` sorted by canonical name (a name found twice: the
    first root's, then the first version string's) and each one's `.py` files by
    relative path; each file once (the first distribution to list it)."""
    found = []
    for rank, root in enumerate(roots):
        for dist in importlib.metadata.distributions(path=[str(root)]):
            name = canonical_name(dist.metadata["Name"] or "")
            if name and name not in SKIP_DISTRIBUTIONS:
                found.append((name, rank, dist.version or "", root, dist))
    found.sort(key=lambda d: d[:3])
    seen_names, seen_files, result = set(), set(), []
    for name, _, version, root, dist in found:
        if name in seen_names:
            continue
        seen_names.add(name)
        files = {}
        for entry in dist.files or ():  # None: no RECORD, nothing to read
            relative = pathlib.PurePosixPath(str(entry))
            if (
                relative.suffix != ".py"
                or SKIP_PARTS & set(relative.parts)
                or _GENERATED.fullmatch(relative.name)
                or ".." in relative.parts
                or relative.is_absolute()
            ):
                continue
            path = root / relative
            if path.is_file() and path.resolve() not in seen_files:
                seen_files.add(path.resolve())
                files[str(relative)] = path
        if files:
            result.append((name, version, sorted(files.items())))
    return result
