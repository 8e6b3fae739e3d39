"""The `timerome` CLI: info and convert, and the one-line error contract."""

import subprocess
import sys
from pathlib import Path

import pytest

from timerome_jax.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "llada"


def test_info_prints_architecture_and_parameter_count(capsys):
    assert main(["info", "--model", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "family       llada" in out and "layers       3" in out
    # 384*64 embed + 384*64 head + 64 final norm + 3 * (4*64*64 + 3*64*128 + 2*64)
    assert f"{2 * 384 * 64 + 64 + 3 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64):,}" in out


def test_info_verify_loads_weights(capsys):
    assert main(["info", "--model", str(FIXTURE), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_convert_then_info(tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["convert", "--model", str(FIXTURE), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert main(["info", "--model", str(out)]) == 0
    assert "orbax" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["info", "--model", "/definitely/not/here"], "neither a directory nor an embedded model"),
    (["convert", "--model", str(FIXTURE), "--out", str(FIXTURE)], "already exists"),
])
def test_errors_are_one_line_with_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_empty_dir_error_through_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "timerome_jax.cli", "info", "--model", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"timerome info: error: {tmp_path} is empty: expected a "
                                                "Hugging Face checkpoint (config.json and *.safetensors) "
                                                "or the output of `timerome convert`"]


def test_debug_flag_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "timerome_jax.cli", "info", "--model", str(tmp_path), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
