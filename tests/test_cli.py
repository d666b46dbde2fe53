"""The `spatext` dispatcher: bad input gives a one-line error and exit status 2, not a traceback."""

from __future__ import annotations

import pytest

from spatext.cli import DEBUG_ENV, main


def test_bad_input_is_a_message_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    pattern = str(tmp_path / "missing" / "*.tar")
    assert main(["build", "--input", pattern, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"spatext build: error: --input '{pattern}' matches no file" in err
    assert "Traceback" not in err and DEBUG_ENV in err
    assert main(["sample", "--run", str(tmp_path / "nothing"), "--prompt", "p", "--scene", "s.json",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "spatext sample: error: --run" in capsys.readouterr().err


def test_debug_env_keeps_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="matches no file"):
        main(["build", "--input", str(tmp_path / "*.tar"), "--output", str(tmp_path / "out")])


def test_usage_and_unknown_command(capsys):
    assert main([]) == 0 and "commands:" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
