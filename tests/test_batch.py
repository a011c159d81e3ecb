from pathlib import Path

import pytest

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.pipeline.batch import plan_jobs, read_prompts, slugify


def test_slugify():
    assert slugify("A red cube, left of a BLUE sphere!") == "a-red-cube-left-of-a-blue-sphere"
    assert slugify("???") == "scene"
    assert len(slugify("word " * 40)) <= 48


def test_single_prompt_job_defaults_to_out_slug():
    (job,) = plan_jobs("a wooden cabin", None, None, 7)
    assert (job.prompt, job.seed, job.out_dir) == ("a wooden cabin", 7, Path("out/a-wooden-cabin"))


def test_prompts_file_gives_one_folder_and_seed_per_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na red cube\n\n  a blue cone  \n")
    jobs = plan_jobs(None, path, tmp_path / "runs", 10)
    assert [j.prompt for j in jobs] == ["a red cube", "a blue cone"]
    assert [j.seed for j in jobs] == [10, 11]
    assert [j.out_dir.name for j in jobs] == ["000-a-red-cube", "001-a-blue-cone"]
    assert plan_jobs(None, path, tmp_path / "runs", 10) == jobs  # deterministic


@pytest.mark.parametrize("prompt, has_file, match", [
    (None, False, "exactly one"), ("x", True, "exactly one"), ("   ", False, "prompt is empty")])
def test_bad_job_requests(tmp_path, prompt, has_file, match):
    path = tmp_path / "p.txt"
    path.write_text("a cube\n")
    with pytest.raises(Vist3AInputError, match=match):
        plan_jobs(prompt, path if has_file else None, None, 0)


def test_bad_prompt_files(tmp_path):
    with pytest.raises(Vist3AInputError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(Vist3AInputError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(Vist3AInputError, match="not UTF-8"):
        read_prompts(tmp_path / "binary.txt")
