"""Untrusted inputs, for experiments/reliability.py: hostile and damaged shards,
Hugging Face checkpoints, model configs and generation requests, and signals
during tokenize, convert and a slow set-up, each tried through the real CLI in
a fresh folder.

Each trial copies what it needs from shared fixtures (a corpus, byte and BPE
shards, a short run, a Hugging Face checkpoint with a tokenizer) into its own
folder, damages it, runs one `muonjax` command there and records its command,
exit code, stderr's lines, the files it left and its peak RSS. Expected:

- refused: exit 2, one stderr line, no traceback, nothing written;
- fallback: exit 0 with one warning line (a damaged newest checkpoint), the
  run's files untouched;
- signal: one line, exit 75 (train) or 128 + the signal, nothing left behind.

No trial may hang (60 s) or read outside its folder: what a hostile manifest
or index points outside at is a FIFO, on which an open() would block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "hf"
TIMEOUT_S = 60
RUN_FLAGS = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress",
             "--cpu-devices", "1"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    surface: str
    expect: str  # "refused" | "fallback" | "signal"
    prepare: object  # (fixtures: pathlib.Path, here: pathlib.Path) -> list[str], the muonjax args
    signal: int | None = None
    signal_when: object = None  # (here) -> bool: send the signal once true (polled)


def muonjax(args, cwd, *, timeout=TIMEOUT_S, stdout=subprocess.DEVNULL):
    """Runs `python -m muonjax ARGS` in `cwd`: (exit code, stderr) (exit code
    "timeout" after `timeout` s)."""
    done = subprocess.run([sys.executable, "-m", "muonjax", *args], cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)  # fmt: skip
    return done.returncode, done.stderr


# -- fixtures -------------------------------------------------------------------------------------


def make_fixtures(root: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    """In `root`: the corpus, its shards (byte, BPE 300) and another corpus's (byte,
    BPE 400), a 4-step run with checkpoints 2 and 4, and a Hugging Face checkpoint
    with a tokenizer.json."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = shutil.copytree(corpus, root / "corpus")
    other = root / "other-corpus"
    other.mkdir()
    (other / "a.txt").write_text("another corpus entirely, " * 4000)
    steps = [
        ["tokenize", "--data", str(corpus), "--out", "shards"],
        ["tokenize", "--data", str(other), "--out", "other-shards"],
        ["tokenize", "--data", str(corpus), "--out", "bpe300", "--tokenizer", "bpe",
         "--bpe-vocab-size", "300"],
        ["tokenize", "--data", str(other), "--out", "bpe400", "--tokenizer", "bpe",
         "--bpe-vocab-size", "400"],
        ["train", "--out", "run", "--data", str(corpus), "--model", "n_layers=1,first_k_dense=1",
         "--steps", "4", "--checkpoint-every", "2", "--batch-size", "2", "--seq-len", "16",
         "--no-progress"],
    ]  # fmt: skip
    for args in steps:
        code, err = muonjax(args, root, timeout=600)
        if code != 0:
            sys.exit(f"untrusted: fixture {' '.join(args)} failed ({code}): {err}")
    hf = root / "hf"
    shutil.copytree(FIXTURE / "deepseek_v3_tiny", hf)
    _write_tokenizer(hf, (corpus / n for n in sorted(os.listdir(corpus))))
    return root


def _write_tokenizer(checkpoint: pathlib.Path, files) -> None:
    """A checkpoint tokenizer: tokenizer.json (a BPE of 300 ids, under the model's
    320) and the tokenizer_config.json that names its BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator((p.read_text() for p in files), trainer=trainer)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))


def _copy(fixtures: pathlib.Path, here: pathlib.Path, name: str) -> pathlib.Path:
    shutil.copytree(fixtures / name, here / name, symlinks=True)
    return here / name


def _outside_fifo(here: pathlib.Path) -> pathlib.Path:
    """A FIFO outside the trial's inputs: opening it would block, so a read is a hang."""
    os.mkfifo(here / "outside")
    return here / "outside"


def _edit_json(path: pathlib.Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_shard(shards: pathlib.Path, split: str = "train") -> pathlib.Path:
    return shards / json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"][0]


def _newest_checkpoint_damaged(run: pathlib.Path) -> None:
    """The newest checkpoint's array files truncated to a third (generate and convert
    read the parameters only, which its biggest file need not hold)."""
    newest = max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))  # fmt: skip
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            os.truncate(path, path.stat().st_size // 3)


# -- the trials -----------------------------------------------------------------------------------


def _shards(edit):
    """A trial on a copy of the byte shards: `edit(shards, fixtures, here)`, then one
    training step on them."""

    def prepare(fixtures, here):
        shards = _copy(fixtures, here, "shards")
        edit(shards, fixtures, here)
        return ["train", "--out", "run", "--data", str(shards), *RUN_FLAGS]

    return prepare


def _manifest_shard(name_of):
    def edit(shards, fixtures, here):
        name = name_of(here)
        _edit_json(
            shards / "manifest.json", lambda m: m["splits"]["train"]["shards"].__setitem__(0, name)
        )

    return _shards(edit)


def _manifest(edit):
    return _shards(lambda s, fixtures, here: _edit_json(s / "manifest.json", edit))


def _swap_shard(s, fixtures, here):
    shutil.copyfile(_first_shard(fixtures / "other-shards"), _first_shard(s))


def _flip_bytes(s, fixtures, here):
    path = _first_shard(s)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _fifo_shard(s, fixtures, here):
    path = _first_shard(s)
    path.unlink()
    os.mkfifo(path)


def _bpe_swapped(fixtures, here):
    shards = _copy(fixtures, here, "bpe300")
    shutil.copyfile(fixtures / "bpe400" / "tokenizer.json", shards / "tokenizer.json")
    return ["train", "--out", "run", "--data", str(shards), *RUN_FLAGS]


def _hf(edit, command="generate"):
    """A trial on a copy of the Hugging Face checkpoint: `edit(hf, here)`, then
    `generate` from it (or `convert --from-hf`)."""

    def prepare(fixtures, here):
        hf = _copy(fixtures, here, "hf")
        edit(hf, here)
        if command == "convert":
            return ["convert", "--from-hf", str(hf), "--out", "converted"]
        return ["generate", "--run", str(hf), "--prompt", "def ", "--max-new-tokens", "4"]

    return prepare


def _hf_config(**changes):
    return _hf(lambda hf, here: _edit_json(hf / "config.json", lambda c: c.update(changes)))


def _index_entry(file_of):
    def edit(hf, here):
        def point(index):
            name = next(iter(index["weight_map"]))
            index["weight_map"][name] = file_of(here)

        _edit_json(hf / "model.safetensors.index.json", point)

    return _hf(edit)


def _safetensors_header(edit):
    """The first safetensors file rewritten with `edit(header) -> header` (data kept)."""

    def change(hf, here):
        path = sorted(hf.glob("*.safetensors"))[0]
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.dumps(edit(json.loads(raw[8 : 8 + n]))).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])

    return _hf(change)


def _dtype(dtype):
    """The first file's first tensor stored as `dtype` (a valid file: only the type is wrong)."""

    def change(hf, here):
        from safetensors.numpy import load_file, save_file

        path = sorted(hf.glob("*.safetensors"))[0]
        tensors = load_file(path)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].astype(dtype)
        save_file(tensors, path, metadata={"format": "pt"})

    return _hf(change)


def _overlap(header):
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    return header


def _raw_header_length(length):
    def change(hf, here):
        path = sorted(hf.glob("*.safetensors"))[0]
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", length) + raw[8:])

    return _hf(change)


def _truncate_safetensors(hf, here):
    path = sorted(hf.glob("*.safetensors"))[0]
    os.truncate(path, path.stat().st_size // 2)


def _fifo_safetensors(hf, here):
    path = sorted(hf.glob("*.safetensors"))[0]
    path.unlink()
    os.mkfifo(path)


def _run(args, damaged=False):
    """A trial on a copy of the 4-step run (its newest checkpoint damaged or not)."""

    def prepare(fixtures, here):
        run = _copy(fixtures, here, "run")
        if damaged:
            _newest_checkpoint_damaged(run)
        return [a.replace("RUN", str(run)) for a in args]

    return prepare


def _train(*args):
    def prepare(fixtures, here):
        return ["train", "--out", "run", "--data", str(fixtures / "corpus"), *RUN_FLAGS, *args]

    return prepare


def _slow_tokenize(fixtures, here):
    big = here / "big"
    big.mkdir()
    text = "".join(p.read_text() for p in sorted((fixtures / "corpus").iterdir()))
    for i in range(8):
        (big / f"{i}.txt").write_text(text)
    return ["tokenize", "--data", str(big), "--out", "shards", "--tokenizer", "bpe",
            "--bpe-vocab-size", "4096"]  # fmt: skip


def _partial_exists(here: pathlib.Path) -> bool:
    return any(p.name.startswith(".") and ".partial" in p.name for p in here.iterdir())


def _convert_from_hf(fixtures, here):
    hf = _copy(fixtures, here, "hf")
    return ["convert", "--from-hf", str(hf), "--out", "converted"]


def _slow_setup(fixtures, here):
    # a model that takes seconds to compile: the signal lands in set-up or compilation
    return ["train", "--out", "run", "--data", str(fixtures / "corpus"), *RUN_FLAGS,
            "--model", "n_layers=8,first_k_dense=2,d_model=256,n_routed_experts=32"]  # fmt: skip


def _after(seconds):
    started = {}

    def when(here):
        started.setdefault("t", time.monotonic())
        return time.monotonic() - started["t"] >= seconds

    return when


TRIALS = [
    # shards: confinement, schema, integrity, damage
    Trial("manifest ../ path", "train --data SHARDS", "refused",
          _manifest_shard(lambda here: (_outside_fifo(here), "../outside")[1])),
    Trial("manifest absolute path", "train --data SHARDS", "refused",
          _manifest_shard(lambda here: str(_outside_fifo(here)))),
    Trial("manifest record_tokens 0", "train --data SHARDS", "refused",
          _manifest(lambda m: m.update(record_tokens=0))),
    Trial("manifest missing key", "train --data SHARDS", "refused",
          _manifest(lambda m: m.pop("vocab_size"))),
    Trial("manifest dtype <u2", "train --data SHARDS", "refused",
          _manifest(lambda m: m["splits"]["train"].update(dtype="<u2"))),
    Trial("manifest token count lies", "train --data SHARDS", "refused",
          _manifest(lambda m: m["splits"]["train"].update(tokens=m["splits"]["train"]["tokens"] + 5000))),
    Trial("shard bytes changed", "train --data SHARDS", "refused", _shards(_flip_bytes)),
    Trial("shard swapped for another corpus's", "train --data SHARDS", "refused",
          _shards(_swap_shard)),
    Trial("shard truncated", "train --data SHARDS", "refused",
          _shards(lambda s, fixtures, here: os.truncate(_first_shard(s), _first_shard(s).stat().st_size // 3))),
    Trial("shard is a FIFO", "train --data SHARDS", "refused", _shards(_fifo_shard)),
    Trial("BPE tokenizer.json swapped", "train --data SHARDS", "refused", _bpe_swapped),
    # Hugging Face checkpoints
    Trial("index ../ file", "generate --run HF", "refused",
          _index_entry(lambda here: (_outside_fifo(here), "../outside")[1])),
    Trial("index absolute file", "generate --run HF", "refused",
          _index_entry(lambda here: str(_outside_fifo(here)))),
    Trial("F64 tensor", "generate --run HF", "refused", _dtype("float64")),
    Trial("I8 tensor", "generate --run HF", "refused", _dtype("int8")),
    Trial("overlapping offsets", "generate --run HF", "refused", _safetensors_header(_overlap)),
    Trial("header length 2^62", "generate --run HF", "refused", _raw_header_length(2**62)),
    Trial("safetensors truncated", "generate --run HF", "refused", _hf(_truncate_safetensors)),
    Trial("safetensors is a FIFO", "generate --run HF", "refused", _hf(_fifo_safetensors)),
    Trial("num_hidden_layers 10^9", "generate --run HF", "refused",
          _hf_config(num_hidden_layers=10**9)),
    Trial("n_routed_experts 10^9", "convert --from-hf HF", "refused",
          _hf(lambda hf, here: _edit_json(hf / "config.json",
                                          lambda c: c.update(n_routed_experts=10**9)), "convert")),
    Trial("kv_lora_rank -4", "generate --run HF", "refused", _hf_config(kv_lora_rank=-4)),
    Trial('n_group "2"', "generate --run HF", "refused", _hf_config(n_group="2")),
    # the trainer's own bounds
    Trial("--model n_routed_experts=10^7", "train", "refused",
          _train("--model", "n_routed_experts=10000000")),
    Trial("--model vocab_size=10^10", "train", "refused", _train("--model", "vocab_size=10000000000")),
    Trial("--model kv_lora_rank=0", "train", "refused", _train("--model", "kv_lora_rank=0")),
    Trial("--grad-accum 0", "train", "refused", _train("--grad-accum", "0")),
    Trial("--skip-batches 10^12", "train --resume", "refused",
          _run(["train", "--out", "RUN", "--resume", "--steps", "6", "--skip-batches",
                "1000000000000", "--no-progress"])),
    # generation
    Trial("--max-new-tokens 10^9", "generate", "refused",
          _run(["generate", "--run", "RUN", "--prompt", "x", "--max-new-tokens", "1000000000"])),
    Trial("100k-character prompt", "generate", "refused",
          _run(["generate", "--run", "RUN", "--prompt", "x" * 100_000])),
    Trial("--temperature nan", "generate", "refused",
          _run(["generate", "--run", "RUN", "--prompt", "x", "--temperature", "nan"])),
    Trial("--seed 10^23", "generate", "refused",
          _run(["generate", "--run", "RUN", "--prompt", "x", "--seed", str(10**23)])),
    # a damaged newest checkpoint: the newest intact one, with a warning
    Trial("damaged newest checkpoint", "generate", "fallback",
          _run(["generate", "--run", "RUN", "--prompt", "x", "--max-new-tokens", "2"], True)),
    Trial("damaged newest checkpoint", "convert --to-hf", "fallback",
          _run(["convert", "--to-hf", "RUN", "--out", "exported"], True)),
    Trial("damaged newest checkpoint", "train --resume", "fallback",
          _run(["train", "--out", "RUN", "--resume", "--steps", "5", "--no-progress"], True)),
    # signals
    Trial("SIGINT during BPE tokenize", "tokenize", "signal", _slow_tokenize,
          signal.SIGINT, _partial_exists),
    Trial("SIGTERM during BPE tokenize", "tokenize", "signal", _slow_tokenize,
          signal.SIGTERM, _partial_exists),
    Trial("SIGTERM during convert --from-hf", "convert", "signal", _convert_from_hf,
          signal.SIGTERM, _after(4.0)),
    Trial("SIGTERM during set-up / compilation", "train", "signal", _slow_setup,
          signal.SIGTERM, _after(6.0)),
]  # fmt: skip
QUICK = ("manifest ../ path", "shard bytes changed", "index ../ file", "num_hidden_layers 10^9",
         "--temperature nan", "SIGINT during BPE tokenize")  # fmt: skip


# -- running one ----------------------------------------------------------------------------------


def _files(folder: pathlib.Path) -> dict[str, tuple]:
    """Every path under `folder` with its size and modification time (a folder's
    only its presence: a lock file made and removed in it changes its time)."""
    out = {}
    for path in folder.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(folder))] = () if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def _peak_rss_mib(pid: int, last: float) -> float:
    """The process's peak RSS so far (VmHWM; wait4's ru_maxrss would carry over this
    process's own across fork and exec), or `last` once it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return last


def _wait(proc, trial: Trial, here: pathlib.Path) -> dict:
    """Waits for `proc` (sending the trial's signal when due): exit code, peak
    RSS (MiB, VmHWM polled every 10 ms), whether it hung, and seconds from the
    signal to the exit."""
    start, sent, peak = time.monotonic(), None, 0.0
    while True:
        peak = _peak_rss_mib(proc.pid, peak)  # polled: the last reading before it exits
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if trial.signal is not None and sent is None and trial.signal_when(here):
            proc.send_signal(trial.signal)
            sent = now
        if now - start > TIMEOUT_S:
            proc.kill()
            os.waitpid(proc.pid, 0)
            return {"exit_code": "timeout", "hung": True, "peak_rss_mib": peak}
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    record = {"exit_code": proc.returncode, "hung": False, "peak_rss_mib": peak}
    if trial.signal is not None:
        record["signal_sent"] = sent is not None
        record["exit_after_signal_s"] = round(time.monotonic() - sent, 2) if sent else None
    return record


def run_trial(trial: Trial, fixtures: pathlib.Path, scratch: pathlib.Path) -> dict:
    here = scratch / f"trial-{TRIALS.index(trial):02d}"
    here.mkdir(parents=True)
    args = trial.prepare(fixtures, here)
    before = _files(here)
    logs = here.parent / f"{here.name}.stdout", here.parent / f"{here.name}.stderr"
    with open(logs[0], "w+") as out, open(logs[1], "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "muonjax", *args], cwd=here,
                                stdout=out, stderr=err)  # fmt: skip
        record = _wait(proc, trial, here)
    stdout, lines = ([x for x in p.read_text().splitlines() if x.strip()] for p in logs)
    warnings = [line for line in stdout + lines if line.startswith("warning")]
    after = _files(here)
    shown = [a if len(a) < 120 else a[:100] + f"... ({len(a)} characters)" for a in args]
    record.update(
        name=trial.name, surface=trial.surface, expect=trial.expect,
        command=["muonjax", *shown], stderr_lines=len(lines),
        stderr_first=lines[0] if lines else None,
        left=sorted(set(after) - set(before)),
        changed=sorted(p for p in set(before) & set(after) if before[p] != after[p]),
        warnings=warnings, traceback=any("Traceback" in line for line in lines),
    )  # fmt: skip
    record["failures"] = _failures(trial, record, lines)
    record["passed"] = not record["failures"]
    return record


def _failures(trial: Trial, r: dict, lines: list[str]) -> list[str]:
    failures = []
    if r["hung"]:
        return [f"no exit within {TIMEOUT_S} s (a hang, or a read of the outside FIFO)"]
    if r["traceback"]:
        failures.append("a traceback on stderr")
    # a fallback's warning may go to stdout (train's log) or stderr (generate, convert)
    others = [line for line in lines if line not in r["warnings"]]
    if trial.expect == "fallback" and others:
        failures.append(f"{len(others)} stderr lines besides the warning, expected none")
    elif trial.expect != "fallback" and len(lines) != 1:
        failures.append(f"{len(lines)} stderr lines, expected 1")
    if trial.expect == "refused":
        if r["exit_code"] != 2:
            failures.append(f"exit {r['exit_code']}, expected 2")
        if r["left"] or r["changed"]:
            failures.append(f"wrote {(r['left'] + r['changed'])[:5]}")
    elif trial.expect == "fallback":
        if r["exit_code"] != 0:
            failures.append(f"exit {r['exit_code']}, expected 0")
        if len(r["warnings"]) != 1:
            failures.append(f"{len(r['warnings'])} warning lines, expected 1")
        if trial.surface != "train --resume" and r["changed"]:
            failures.append(f"changed the run it read: {r['changed'][:5]}")
    else:
        expected = (75,) if trial.surface == "train" else (128 + trial.signal,)
        if not r.get("signal_sent"):
            failures.append("the command ended before the signal was sent")
        elif r["exit_code"] not in expected:
            failures.append(f"exit {r['exit_code']}, expected {expected[0]}")
        elif trial.surface != "train" and r["left"]:
            failures.append(f"left {r['left'][:5]}")
    return failures
