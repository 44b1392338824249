"""Bad input to `muonjax train`: one line on stderr, exit code 2, nothing overwritten."""

import subprocess
import sys

import pytest

RUN = [sys.executable, "-m", "muonjax", "train", "--no-progress"]


def _train(*args, cwd):
    return subprocess.run([*RUN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _assert_usage_error(result, match):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert match in lines[0], lines[0]


@pytest.fixture
def text_dir(tmp_path):
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("hello world, this is some text to train on.\n" * 200)
    return data


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["--preset", "huge"],
            "--preset 'huge' is unknown (valid: tiny, small, moonlight-16b-a3b)",
        ),
        (["--optimizer", "sgd"], "--optimizer 'sgd' is unknown (valid: muon, adamw)"),
        (["--steps", "-3"], "--steps must be positive, got -3"),
        (["--learning-rate=-0.001"], "--learning-rate must be positive and finite, got -0.001"),
        (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (
            ["--data", "no/such/file.txt"],
            "--data no/such/file.txt is not a file or folder and matches no file",
        ),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--model", "d_model=wide"], "--model d_model=wide: expected int"),
        (["--model", "heads=4"], "--model: unknown key heads (valid: d_model, n_layers"),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
        (["--model-config", "no/such.json"], "--model-config no/such.json: No such file"),
    ],
)
def test_bad_flags(tmp_path, args, match):
    _assert_usage_error(_train("--out", str(tmp_path / "run"), *args, cwd=tmp_path), match)
    assert not (tmp_path / "run").exists()


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    folder = tmp_path / "nothing"
    folder.mkdir()
    for path, match in [
        (empty, "holds no text (all files are empty)"),
        (latin1, "is not UTF-8 text (invalid byte at offset 3)"),
        (binary, "looks binary (NUL byte at offset 8)"),
        (folder, "holds no files"),
    ]:
        result = _train("--out", str(tmp_path / "run"), "--data", str(path), cwd=tmp_path)
        _assert_usage_error(result, match)
    assert not (tmp_path / "run").exists()


def test_too_little_data(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus\n")
    result = _train("--out", str(tmp_path / "run"), "--data", str(small), cwd=tmp_path)
    _assert_usage_error(result, "fewer than one batch")


def test_batch_not_divisible_by_data_parallel_size(tmp_path, text_dir):
    result = _train(
        "--out",
        str(tmp_path / "run"),
        "--cpu-devices",
        "8",
        "--batch-size",
        "12",
        "--data",
        str(text_dir),
        cwd=tmp_path,
    )
    _assert_usage_error(result, "--batch-size 12 is not divisible by the data-parallel size 8")


def test_existing_out_is_never_overwritten(tmp_path, text_dir):
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not touch")
    result = _train("--out", str(out), "--data", str(text_dir), cwd=tmp_path)
    _assert_usage_error(result, f"--out {out} already exists; pass --resume")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert keep.read_text() == "do not touch"


def test_resume_with_nothing_to_resume(tmp_path):
    result = _train("--out", str(tmp_path / "none"), "--resume", cwd=tmp_path)
    _assert_usage_error(result, "nothing to resume in")


def test_resume_with_incompatible_config(tmp_path, text_dir):
    out = tmp_path / "run"
    args = [
        "--out",
        str(out),
        "--data",
        str(text_dir),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
    ]
    assert _train(*args, cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _train(
        "--out", str(out), "--resume", "--steps", "4", "--learning-rate", "0.5", cwd=tmp_path
    )
    _assert_usage_error(result, "was trained with another config (learning_rate: 0.01 -> 0.5)")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_help_explains_every_flag():
    result = subprocess.run([*RUN[:-1], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in [
        "--preset",
        "--optimizer",
        "--steps",
        "--batch-size",
        "--seq-len",
        "--learning-rate",
        "--warmup-steps",
        "--weight-decay",
        "--seed",
        "--data",
        "--out",
        "--resume",
        "--checkpoint-every",
        "--eval-every",
        "--cpu-devices",
        "--tokenizer",
    ]:
        assert flag in result.stdout
