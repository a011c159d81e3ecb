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


def test_public_api_names_resolve():
    import vist3a_rt as vr
    import vist3a_rt.rendering  # noqa: F401 - a submodule import must not shadow vr.render

    assert callable(vr.render) and callable(vr.load_stitched_decoder)
    assert vr.GaussianScene.__name__ == "GaussianScene" and vr.Vist3A.__name__ == "Vist3A"


def test_train_group_is_registered(capsys):
    assert main(["train", "--help"]) == 0
    assert "layer-search" in capsys.readouterr().out
