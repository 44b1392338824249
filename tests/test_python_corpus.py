"""--corpus python (python_corpus.py): the standard library's source, then every
installed distribution's, read in a fixed order and fingerprinted, with the
distributions' versions in its summary; tested on a fake site folder, and once
on this environment's."""

import importlib.metadata
import json

import pytest

from muonjax.cli import main
from muonjax.train import corpus as corpus_module
from muonjax.train import python_corpus as pc
from muonjax.train.config import TrainConfig
from muonjax.train.corpus import load_corpus
from muonjax.train.errors import ConfigError
from muonjax.train.shards import MANIFEST


def _distribution(site, name, version, files: dict):
    """A distribution as an installer leaves it: its files, and a .dist-info
    folder whose RECORD lists them."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for relative, data in files.items():
        path = site / relative
        if not relative.startswith(".."):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in record))


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    # made out of order: the corpus's order is the names', not the filesystem's
    _distribution(site, "Zeta_Pkg", "0.3", {"zeta.py": b"Z = 26\n"})
    _distribution(
        site,
        "alpha",
        "1.0",
        {
            "alpha/core.py": b"def f():\n    return 1\n",
            "alpha/__init__.py": b"from .core import f\n",
            "alpha/tests/test_core.py": b"def test_f():\n    pass\n",
            "alpha/__pycache__/core.py": b"cached = True\n",
            "alpha/latin1.py": "caf\xe9 = 1\n".encode("latin-1"),  # not UTF-8
            "alpha/binary.py": b"x = 1\0\n",
            "alpha/data.txt": b"not python\n",
            "../../bin/alpha-script.py": b"",  # outside the site folder
            "__editable___alpha_finder.py": b"MAPPING = {'alpha': '/home/me/alpha'}\n",
        },
    )
    _distribution(site, "muonjax", "0.1.0", {"muonjax/__init__.py": b"edited = 'every day'\n"})
    (site / "stray.py").write_text("owner = None\n")  # in no RECORD
    return site


def _installed(corpus):
    """The corpus's files after the standard library's."""
    return corpus.paths[len(load_corpus().paths) :]


def test_reads_the_distributions_in_order_after_the_stdlib(site):
    corpus = corpus_module.read_python_corpus((site,))
    stdlib = load_corpus()
    assert corpus.texts[: len(stdlib.texts)] == stdlib.texts
    assert corpus.paths[: len(stdlib.paths)] == stdlib.paths
    # muonjax's own source, __pycache__, editable finders, unowned, binary and
    # non-UTF-8 files are left out; test folders are kept
    assert _installed(corpus) == (
        "alpha/__init__.py",
        "alpha/core.py",
        "alpha/tests/test_core.py",
        "zeta.py",
    )
    assert corpus.texts[-1] == "Z = 26\n"
    summary = corpus.summary()
    assert summary["distributions"] == {"alpha": "1.0", "zeta-pkg": "0.3"}
    assert summary["last"] == "zeta.py"
    assert "distributions" not in stdlib.summary()


def test_deterministic_and_fingerprinted_over_the_bytes(site):
    first, again = (corpus_module.read_python_corpus((site,)) for _ in range(2))
    assert first == again
    assert first.fingerprint != load_corpus().fingerprint
    (site / "alpha" / "core.py").write_bytes(b"def f():\n    return 2\n")
    changed = corpus_module.read_python_corpus((site,))
    assert changed.paths == first.paths and changed.fingerprint != first.fingerprint
    # where one file ends and the next begins counts too
    (site / "alpha" / "core.py").write_bytes(b"def f():\n    return 1\n\n")
    (site / "alpha" / "__init__.py").write_bytes(b"from .core import f")
    assert corpus_module.read_python_corpus((site,)).fingerprint != first.fingerprint


def test_a_file_listed_twice_or_a_root_given_twice_is_read_once(site):
    once = corpus_module.read_python_corpus((site,))
    assert corpus_module.read_python_corpus((site, site)).paths == once.paths
    # a second distribution claiming alpha's file: read with the first, by name
    _distribution(site, "omega", "9", {"alpha/core.py": b"def f():\n    return 1\n"})
    assert corpus_module.read_python_corpus((site,)) == once


def test_corpus_goes_without_data():
    assert TrainConfig(corpus="python").corpus == "python"
    assert TrainConfig(data=("a.txt",), corpus="stdlib").data == ("a.txt",)
    with pytest.raises(ConfigError, match="--corpus python goes without --data"):
        TrainConfig(data=("a.txt",), corpus="python")
    with pytest.raises(ConfigError, match="--corpus 'pypi' is unknown .valid: stdlib, python"):
        TrainConfig(corpus="pypi")


@pytest.mark.slow  # tokenizes the standard library through the CLI
def test_tokenize_shards_the_python_corpus(site, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus_module, "site_dirs", lambda: (site,))
    out = tmp_path / "shards"
    assert main(["tokenize", "--corpus", "python", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    corpus = corpus_module.read_python_corpus((site,))
    source = manifest["source"]
    assert source["fingerprint"] == corpus.fingerprint
    assert source["distributions"] == {"alpha": "1.0", "zeta-pkg": "0.3"}
    assert source["files"] == len(corpus.paths)
    assert source["train_tokens"] + source["validation_tokens"] == sum(
        len(t.encode()) for t in corpus.texts
    )
    capsys.readouterr()
    assert main(["tokenize", "--corpus", "python", "--data", str(site), "--out", str(out)]) == 2
    assert "--corpus python goes without --data" in capsys.readouterr().err


@pytest.mark.slow  # reads ~100 MB (about 2 s)
def test_this_environments_corpus():
    corpus = corpus_module.python_corpus()
    assert corpus_module.python_corpus() is corpus  # read once per process
    assert load_corpus(corpus="python") is corpus
    stdlib = load_corpus()
    assert corpus.paths[: len(stdlib.paths)] == stdlib.paths
    installed = corpus.paths[len(stdlib.paths) :]
    assert installed, "no installed distribution's source was read"
    assert not [p for p in installed if p.startswith("muonjax/") or "__pycache__" in p]
    versions = corpus.summary()["distributions"]
    assert "muonjax" not in versions
    assert versions["jax"] == importlib.metadata.version("jax")
    assert corpus_module.read_python_corpus(pc.site_dirs()).fingerprint == corpus.fingerprint
