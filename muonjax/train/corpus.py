"""The text a run trains on: files, folders or globs, or by default the Python
standard library's own source, read in a fixed order and fingerprinted."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import pathlib
import sysconfig

from muonjax.train.config import ConfigError

# Left out of the default corpus: third-party code, and the test suites,
# which hold deliberately mis-encoded files.
_STDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    paths: tuple[str, ...]
    fingerprint: str  # sha256 over the files' paths (relative) and bytes, in order

    def describe(self) -> dict:
        return {
            "files": len(self.paths),
            "characters": sum(len(t) for t in self.texts),
            "fingerprint": self.fingerprint,
            "first": self.paths[0],
            "last": self.paths[-1],
        }


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)
    )
    return root, files


def _user_files(patterns: tuple[str, ...]) -> list[pathlib.Path]:
    files = []
    for pattern in patterns:
        path = pathlib.Path(pattern)
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
            if not matched:
                raise ConfigError(f"--data folder {pattern} holds no files")
        else:
            matched = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True))
            matched = [p for p in matched if p.is_file()]
            if not matched:
                raise ConfigError(f"--data {pattern} is not a file or folder and matches no file")
        files.extend(matched)
    return files


def _decode(path: pathlib.Path, data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(
            f"--data file {path} looks binary (NUL byte at offset {nul}); pass text files"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--data file {path} is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None


def load_corpus(patterns: tuple[str, ...] = ()) -> Corpus:
    """Reads the corpus; user files must be non-empty UTF-8 text."""
    digest = hashlib.sha256()
    texts, paths = [], []
    if patterns:
        for path in _user_files(patterns):
            data = path.read_bytes()
            texts.append(_decode(path, data))
            paths.append(str(path))
            digest.update(str(path).encode() + b"\0" + data)
        if not any(texts):
            raise ConfigError(f"--data {' '.join(patterns)} holds no text (all files are empty)")
    else:
        root, files = stdlib_files()
        for path in files:
            data = path.read_bytes()
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            relative = str(path.relative_to(root))
            paths.append(relative)
            digest.update(relative.encode() + b"\0" + data)
    return Corpus(texts=tuple(texts), paths=tuple(paths), fingerprint=digest.hexdigest())


def split_texts(texts: tuple[str, ...], validation_fraction: float) -> tuple[list[str], list[str]]:
    """The last `validation_fraction` of the characters, in corpus order, held out."""
    total = sum(len(t) for t in texts)
    cut = round(total * (1 - validation_fraction))
    train, validation, seen = [], [], 0
    for text in texts:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            validation.append(text)
        else:
            train.append(text[: cut - seen])
            validation.append(text[cut - seen :])
        seen += len(text)
    return train, validation
