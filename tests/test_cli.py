import subprocess
import sys

from vist3a_rt.cli import main


def test_info_reports_versions_and_model_status(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vist3a-rt ")
    assert "torch 2." in out and "embedded model (nano)" in out


def test_unknown_command_is_bad_input():
    assert main(["no-such-command"]) == 2


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "vist3a_rt.cli", "info"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "render backends" in proc.stdout
