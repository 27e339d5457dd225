"""cli_errors: a user's mistake is one `error:` line and exit code 2; a bug keeps its traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mosaicbert_jax.cli_errors import UserError, as_user_error, is_user_error, run_main
from mosaicbert_jax.data.sources import open_source


def _caught(function):
    try:
        function()
    except BaseException as error:  # noqa: BLE001 - the test looks at what was raised
        return error
    raise AssertionError("nothing was raised")


def test_deliberate_errors_are_user_errors_and_bugs_are_not():
    assert is_user_error(_caught(lambda: open_source("csv:/x.csv")))  # a UserError
    assert not is_user_error(_caught(lambda: np.zeros(3).reshape(2, 2)))  # numpy, a bug
    assert not is_user_error(_caught(lambda: int("seven")))  # a ValueError, not ours
    assert not is_user_error(_caught(lambda: {}["key"]))


def test_as_user_error_marks_errors_of_the_block():
    def load():
        with as_user_error(ValueError):
            int("seven")

    error = _caught(load)
    assert isinstance(error, UserError) and "seven" in str(error)
    assert isinstance(_caught(lambda: run_main(lambda: {}["key"])), KeyError), "not converted"


def test_run_main_prints_one_line_and_exits_2(capsys):
    def main():
        raise UserError("--out /x is a file\n give a directory")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --out /x is a file  give a directory\n"
    assert run_main(lambda: 7) == 7
    with pytest.raises(ValueError, match="cannot reshape"):  # a bug: raised as it is
        run_main(lambda: np.zeros(3).reshape(2, 2))


def test_traceback_on_request():
    code = ("from mosaicbert_jax.cli_errors import run_main, UserError\n"
            "def main():\n    raise UserError('bad value')\nrun_main(main)\n")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr == "error: bad value\n"
    verbose = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "MOSAICBERT_TRACEBACK": "1"})
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().endswith("UserError: bad value")
