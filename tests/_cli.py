"""Helpers shared by the command-line tests."""


def error_line(capsys) -> str:
    """The one ``scbranch: error:`` line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("scbranch: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
