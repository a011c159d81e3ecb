"""``--threads auto``: idle cores from the load average; explicit counts; bad values."""

from __future__ import annotations

import os

import pytest

from vist3a_rt import threads
from vist3a_rt.cli import main
from vist3a_rt.errors import Vist3AInputError


@pytest.mark.parametrize("load, cores, expected", [(0.0, 4, 4), (1.2, 4, 3), (2.6, 4, 1), (9.0, 2, 1), (0.4, 2, 2)])
def test_auto_leaves_the_busy_cores_alone(monkeypatch, load, cores, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.resolve_threads("auto") == expected
    assert threads.resolve_threads(None) == expected


def test_explicit_counts_and_errors():
    assert threads.resolve_threads("3") == 3 and threads.resolve_threads(2) == 2
    for bad in ("0", "-1", "many", 0):
        with pytest.raises(Vist3AInputError, match="threads must be"):
            threads.resolve_threads(bad)


def test_generate_refuses_bad_threads_before_loading(tmp_path, capsys):
    assert main(["generate", "a red cube", "--threads", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "threads must be" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
