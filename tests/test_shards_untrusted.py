"""`muonjax tokenize` shards as untrusted input: a shards folder whose manifest
points outside it, lies about its schema or its tokens, whose files were changed,
swapped, truncated or replaced by a FIFO, is one line and exit 2 before
training; tokenize stopped by a signal, or killed, leaves nothing behind.

Most cases call the CLI's `main` in this process; signals and FIFOs (whose
failure is a hang) run a real process with a timeout."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from conftest import DENSE
from test_cli_errors import _assert_usage_error, _train

from muonjax.cli import main
from muonjax.train import TrainConfig
from muonjax.train.data import load_data
from muonjax.train.errors import ConfigError
from muonjax.train.shards import MANIFEST, RECORD_TOKENS, write_shards

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

TOKENIZE = [sys.executable, "-m", "muonjax", "tokenize"]
SMALL = ["--batch-size", "8", "--seq-len", "16", "--steps", "1", "--model", DENSE]


def _text(seed: int, chars: int) -> str:
    """`chars` characters of ASCII words, different for each seed."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(2000)]  # fmt: skip
    text = " ".join(rng.choices(words, k=chars // 3))
    return text[:chars].ljust(chars, ".")


def _tokenize(corpus, out, *flags):
    """`muonjax tokenize --data corpus --out out FLAGS`, in this process; asserts it succeeded."""
    assert main(["tokenize", "--data", str(corpus), "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two corpora "corpus_a" and "corpus_b" of two ASCII files, 20,000 characters
    each (their splits hold 19,600 and 400 tokens: even, so a '<u2' reading fits),
    their bytes in shards of 2 records ("a", "b"), and corpus_a in BPEs of two sizes."""
    root = tmp_path_factory.mktemp("untrusted")
    folders = {}
    for name, seed in (("a", 0), ("b", 1)):
        folder = root / f"corpus_{name}"
        folder.mkdir()
        for i in range(2):
            (folder / f"d{i}.txt").write_text(_text(2 * seed + i, 10_000))
        folders[name] = _tokenize(folder, root / name, "--shard-tokens", str(2 * RECORD_TOKENS))
        folders[f"corpus_{name}"] = folder
    for size in (280, 300):
        folders[f"bpe{size}"] = _tokenize(
            folders["corpus_a"], root / f"bpe{size}", "--tokenizer", "bpe",
            "--bpe-vocab-size", str(size),
        )  # fmt: skip
    return folders


def _copy(shards, tmp_path, edit=None):
    """A copy of the shards folder in tmp_path, its manifest changed by `edit`."""
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    if edit is not None:
        manifest = json.loads((folder / MANIFEST).read_text())
        edit(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _refused(folder, tmp_path, match):
    """`muonjax train --data folder` is one line naming `match`, exit 2, before training."""
    result = _train("--out", tmp_path / "run", "--data", folder, *SMALL, cwd=tmp_path)
    _assert_usage_error(result, match)
    assert not (tmp_path / "run").exists()


def _shard(folder, split="train", index=0):
    """The path of the folder's shard `index` of `split`, as its manifest names it."""
    return folder / json.loads((folder / MANIFEST).read_text())["splits"][split]["shards"][index]


def _records(path) -> list[bytes]:
    """Every record of an ArrayRecord file."""
    reader = ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    return records


def _write_records(path, records) -> None:
    """Rewrites an ArrayRecord file whole, as _write_split does: a valid file."""
    path.unlink()
    writer = ArrayRecordWriter(str(path), "group_size:1,uncompressed")
    for record in records:
        writer.write(record)
    writer.close()


@pytest.mark.parametrize("where", ["relative", "absolute", "subfolder", "..", "NUL"])
def test_a_shard_name_outside_the_folder_is_refused(corpora, tmp_path, where):
    """Each name a file that exists (another corpus's shard, of the same layout, or a
    copy of the folder's own), so that only the rule on names refuses it."""
    folder = _copy(corpora["a"], tmp_path)
    (folder / "sub").mkdir()
    shutil.copy(_shard(folder), folder / "sub")
    name = {
        "relative": os.path.relpath(_shard(corpora["b"]), folder),
        "absolute": str(_shard(corpora["b"]).absolute()),
        "subfolder": f"sub/{_shard(folder).name}",
        "..": "..",
        "NUL": _shard(folder).name + "\0",
    }[where]
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0] = name
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _refused(folder, tmp_path, f"splits.train.shards[0] is {name!r}; valid: the name of a file")


def test_a_symbolic_link_in_the_folder_is_followed(corpora, tmp_path):
    folder = _copy(corpora["a"], tmp_path)
    shard = _shard(folder)
    shard.rename(tmp_path / "kept-elsewhere.array_record")
    shard.symlink_to(tmp_path / "kept-elsewhere.array_record")
    data = load_data(TrainConfig(data=(str(folder),), batch_size=2, seq_len=16), tmp_path)
    assert data.train_tokens[:5].tolist() == list(_records(shard)[0][:5])


DELETE = object()


def _set(path, value):
    """An edit of the manifest: the key at `path` (keys joined by '.') set to `value`,
    or deleted if value is DELETE."""

    def edit(manifest):
        *parents, key = path.split(".")
        for p in parents:
            manifest = manifest[p]
        if value is DELETE:
            del manifest[key]
        else:
            manifest[key] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("record_tokens", DELETE), "manifest.json: the manifest lacks record_tokens"),
        (_set("config", DELETE), "the manifest lacks config"),  # inherit_from_shards reads it
        (_set("comment", "hi"), "the manifest has unknown comment (valid keys: format,"),
        (_set("record_tokens", 0), "record_tokens is 0; valid: an integer >= 1"),
        (_set("vocab_size", "256"), "vocab_size is '256'; valid: an integer >= 1"),
        (_set("splits.train.dtype", "<f4"), "splits.train.dtype is '<f4'; valid: '|u1' or"),
        (_set("splits.train.tokens", -1), "splits.train.tokens is -1; valid: an integer >= 0"),
        (_set("splits.train.shards", []), "splits.train.shards is []; valid: a non-empty list"),
        (_set("splits.validation.sha256", "00"), "splits.validation.sha256 is '00'"),
        (_set("splits.test", {}), "splits has unknown test"),
        (_set("config.tokenizer", "checkpoint"), "config.tokenizer is 'checkpoint'"),
        (_set("config.validation_fraction", 2.0), "json: config: --validation-fraction must be in"),
        (_set("source", []), "source is not a JSON object"),
        (_set("source.train_tokens", 5), "source.train_tokens is 5 but the manifest says 19600"),
    ],
)
def test_a_manifest_off_its_schema_is_one_line(corpora, tmp_path, edit, match):
    _refused(_copy(corpora["a"], tmp_path, edit), tmp_path, match)


def _train_tokens(change, shards=3):
    """An edit of the manifest: the train split's token count changed by `change` (said
    alike where the description repeats it) and its first `shards` files kept."""

    def edit(manifest):
        manifest["splits"]["train"]["tokens"] += change
        manifest["source"]["train_tokens"] += change
        del manifest["splits"]["train"]["shards"][shards:]

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [  # the train split's 19,600 tokens: 4 records of 4096, then one of 3216
        (_train_tokens(-3216), "the train shards hold more than the 4 records the manifest's"),
        (_train_tokens(1), "holds 3216 bytes in train record 4, where the manifest's train tokens"),
        (_train_tokens(4096 - 3216, shards=2), "the train shards hold 4 records, where the"),
    ],
)
def test_token_counts_that_lie_are_caught_reading_the_records(corpora, tmp_path, edit, match):
    _refused(_copy(corpora["a"], tmp_path, edit), tmp_path, match)


def test_changed_tokens_fail_the_sha256(corpora, tmp_path):
    folder = _copy(corpora["a"], tmp_path)
    records = _records(_shard(folder, index=1))
    records[0] = records[0][:100] + b"Z" + records[0][101:]  # a valid byte, a valid file
    _write_records(_shard(folder, index=1), records)
    _refused(folder, tmp_path, "train shards' tokens have sha256")


def test_a_large_folder_is_verified_while_the_run_trains(corpora, tmp_path, monkeypatch):
    """Past VERIFY_AT_START_BYTES the check runs in the background: training starts,
    a folder that verifies ends with exit 0 (after the check), and a changed shard
    stops the run with one line saying which steps trained on it."""
    from muonjax.train import integrity

    monkeypatch.setattr(integrity, "VERIFY_AT_START_BYTES", 0)
    started = []
    real = integrity.Verification.__init__
    monkeypatch.setattr(
        integrity.Verification,
        "__init__",
        lambda self, *a, background: (
            started.append(background) or real(self, *a, background=background)
        ),
    )
    good = _train("--data", corpora["a"], "--out", tmp_path / "good", *SMALL, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    folder = _copy(corpora["a"], tmp_path)
    records = _records(_shard(folder, index=1))
    records[0] = records[0][:100] + b"Z" + records[0][101:]
    _write_records(_shard(folder, index=1), records)
    bad = _train("--data", folder, "--out", tmp_path / "bad", *SMALL, "--steps", "3", cwd=tmp_path)
    _assert_usage_error(bad, "train shards' tokens have sha256")
    assert "stopped after step" in bad.stderr
    assert started == [True, True]


def test_a_shard_swapped_for_another_corpuss_fails_the_sha256(corpora, tmp_path):
    folder = _copy(corpora["a"], tmp_path)
    assert _shard(corpora["b"]).stat().st_size == _shard(folder).stat().st_size  # same layout
    shutil.copy(_shard(corpora["b"]), _shard(folder))
    _refused(folder, tmp_path, "train shards' tokens have sha256")


def test_a_wider_dtype_reads_ids_past_the_vocabulary(corpora, tmp_path):
    """'<u2' with half the tokens in records of half as many: the same bytes (so the
    same sha256 and record sizes), read as ids up to 65,535 with 256 in the vocabulary."""

    def wider(manifest):
        manifest["record_tokens"] //= 2
        for split in ("train", "validation"):
            manifest["splits"][split]["dtype"] = "<u2"
            manifest["splits"][split]["tokens"] //= 2
            manifest["source"][f"{split}_tokens"] //= 2

    folder = _copy(corpora["a"], tmp_path, wider)
    _refused(folder, tmp_path, "outside the vocabulary's ids [0, 256)")


def test_a_swapped_tokenizer_is_caught_by_its_vocabulary(corpora, tmp_path):
    folder = _copy(corpora["bpe300"], tmp_path)
    shutil.copy(corpora["bpe280"] / "tokenizer.json", folder / "tokenizer.json")
    _refused(folder, tmp_path, "the tokenizer has 280 ids but manifest.json says")
    # and with the manifest's vocabulary edited to match: the shards' ids are past it
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["vocab_size"] = manifest["source"]["vocab_size"] = 280
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _refused(folder, tmp_path, "outside the vocabulary's ids [0, 280)")
    (folder / "tokenizer.json").write_text('{"model": ')
    _refused(folder, tmp_path, "tokenizer.json is not a tokenizer the tokenizers library loads")


def test_sft_prompt_tokens_are_valid_down_to_minus_the_vocabulary(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) for i in range(400)]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines))
    folder = _tokenize(tmp_path / "sft.jsonl", tmp_path / "sft", "--data-format", "sft-jsonl")
    config = TrainConfig(data=(str(folder),), data_format="sft-jsonl", batch_size=2, seq_len=16)
    assert load_data(config, tmp_path).train_tokens[:].min() < 0  # prompts: -(id + 1)
    records = _records(_shard(folder))
    tokens = np.frombuffer(records[0], "<i4").copy()
    tokens[0] = -257
    _write_records(_shard(folder), [tokens.tobytes(), *records[1:]])
    with pytest.raises(ConfigError, match=r"holds token -257, outside .* ids \[-256, 256\)"):
        load_data(config, tmp_path)


def _truncated(path):
    """The file's first half."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    """Random bytes, as many as the file had."""
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _flipped(path):
    """One bit changed (ArrayRecord's own chunk checksums catch it, before the sha256)."""
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))


def _replaced_by(kind):
    """The file replaced by a folder, or by a link to a device."""

    def replace(path):
        path.unlink()
        if kind == "folder":
            path.mkdir()
        else:
            path.symlink_to("/dev/zero")

    return replace


@pytest.mark.parametrize(
    "damage, match",
    [
        (_truncated, "is damaged: ArrayRecord cannot read it"),
        (_garbage, "is damaged: ArrayRecord cannot read it"),
        (lambda path: path.write_bytes(b""), "is damaged: ArrayRecord cannot read it"),
        (_flipped, "is damaged: ArrayRecord cannot read it (Corrupted Riegeli"),
        (_replaced_by("folder"), "is not a regular file (it is a directory)"),
        (_replaced_by("device"), "is not a regular file (it is a character device)"),
    ],
)
def test_a_damaged_shard_is_one_line_naming_it(corpora, tmp_path, damage, match):
    folder = _copy(corpora["a"], tmp_path)
    damage(_shard(folder, "validation"))
    _refused(folder, tmp_path, f"validation-00000-of-00001.array_record {match}")


@pytest.mark.parametrize("which", ["shard", MANIFEST, "tokenizer.json"])
def test_a_fifo_in_the_folder_is_refused_without_opening_it(corpora, tmp_path, which):
    folder = _copy(corpora["bpe300"], tmp_path)
    path = _shard(folder) if which == "shard" else folder / which
    path.unlink()
    os.mkfifo(path)
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", "train", "--no-progress", "--out", str(tmp_path / "run"),
         "--data", str(folder), *SMALL],
        capture_output=True, text=True, timeout=120,  # opening the FIFO would block for ever
    )  # fmt: skip
    _assert_usage_error(result, f"{path.name} is not a regular file (it is a FIFO)")


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """About 4 MB of words: its BPE of 8000 takes several seconds to train."""
    folder = tmp_path_factory.mktemp("slow")
    for i in range(2):
        (folder / f"d{i}.txt").write_text(_text(10 + i, 2_000_000))
    return folder


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_tokenize_leaves_nothing(slow_corpus, tmp_path, sig):
    """Sent once the partial folder exists and BPE training has begun: exit 128 + the
    signal at once, one line, nothing left (a lost SIGINT once let it finish, exit 0)."""
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [*TOKENIZE, "--data", str(slow_corpus), "--tokenizer", "bpe", "--bpe-vocab-size", "8000",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not list(tmp_path.glob(".shards.partial-*")) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1)  # into the BPE's training, in C, where a Ctrl-C was once lost
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert stderr.splitlines() == [
        f"muonjax tokenize: {sig.name} received: stopped; nothing was written"
    ], stderr
    assert list(tmp_path.iterdir()) == []  # neither the partial folder nor --out


def test_a_dead_processs_partial_folder_is_removed_and_a_live_ones_kept(corpora, tmp_path):
    dead = tmp_path / ".shards.partial-99999999-1"  # no process has that id
    live = tmp_path / f".shards.partial-{os.getpid()}-1"  # this one: a tokenize still writing
    for folder in (dead, live):
        folder.mkdir()
        (folder / "train-00000-of-00001.array_record").write_bytes(b"half written")
    _tokenize(corpora["corpus_a"], tmp_path / "shards")
    assert not dead.exists() and live.exists()
    assert (tmp_path / "shards" / MANIFEST).is_file()


def _no_work(*args, **kwargs):
    """Stands for data.tokenize, the work, where it must not be reached."""
    raise AssertionError("tokenize started working")


def test_write_shards_refuses_a_dangling_link_before_the_work(corpora, tmp_path, monkeypatch):
    """The library's own check: os.rename would fail on the link only after the work."""
    monkeypatch.setattr("muonjax.train.shards.tokenize", _no_work)
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="exists; muonjax tokenize writes a new folder"):
        write_shards(TrainConfig(data=(str(corpora["corpus_a"]),)), tmp_path / "out")


@pytest.mark.parametrize(
    "out, match",
    [
        ("dangling", "--out {out}: {out} is a symbolic link to"),
        ("existing", "--out {out} exists; muonjax tokenize writes a new folder"),
        ("file/out", "--out {out}: {tmp}/file is not a directory"),
    ],
)
def test_out_problems_are_found_before_the_work(corpora, tmp_path, monkeypatch, capsys, out, match):
    monkeypatch.setattr("muonjax.train.shards.tokenize", _no_work)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "existing").mkdir()
    (tmp_path / "file").write_text("")
    out = tmp_path / out
    code = main(["tokenize", "--data", str(corpora["corpus_a"]), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("muonjax: error: " + match.format(out=out, tmp=tmp_path)), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "existing", "file"]
