"""The nano recipe end to end on the "micro" preset: every stage runs, resumes, extends, and the
assembled folder is a model the runtime loads; the embedded-model plumbing (install, "nano")."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from vist3a_rt import Vist3A  # noqa: E402
from vist3a_rt.cli import main  # noqa: E402
from vist3a_rt.errors import CheckpointError, Vist3AInputError  # noqa: E402
from vist3a_rt.training.nano.recipe import STAGES, RecipeSettings, run_recipe  # noqa: E402
from vist3a_rt.training.nano.workspace import Budget  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TWO = Budget(2)
MICRO = RecipeSettings(preset="micro", vae_budget=TWO, vae_batch=2, vae_stat_clips=4, latent_clips=8,
                       denoiser_budget=TWO, recon_budget=TWO, layer_search_clips=4, stitch_budget=TWO,
                       classifier_budget=TWO, reward_budget=Budget(1), eval_clips_vae=4, eval_clips_recon=1)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    return folder, run_recipe(folder, MICRO)


def test_every_stage_runs_and_records_what_it_did(recipe):
    folder, records = recipe
    assert list(records) == list(STAGES)
    for stage, record in records.items():
        assert (folder / stage / "done.json").is_file()
        assert record["wall_s"] >= 0 and record["commit"] is None or len(record["commit"]) == 40
    for stage in ("vae", "denoiser", "recon", "stitch", "classifier", "reward"):
        assert records[stage]["steps"] == (1 if stage == "reward" else 2)
        lines = (folder / stage / "log.jsonl").read_text().splitlines()
        assert lines and all(torch.isfinite(torch.tensor(v)) for v in json.loads(lines[-1]).values()
                             if isinstance(v, float))
    assert records["layer_search"]["block"] in records["layer_search"]["mse"]
    assert records["stitch"]["block"] == records["layer_search"]["block"]
    assert set(records["reward"]["probe_before"]) == {"reward/consistency", "reward/faithfulness"}


def test_assembled_model_loads_generates_and_has_a_manifest(recipe):
    folder, records = recipe
    model_dir = folder / "assemble" / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["model"] == "vist3a-nano" and manifest["reward_finetuned"] is True
    assert set(manifest["stages"]) == set(STAGES) - {"assemble"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert {"wan/transformer/diffusion_pytorch_model.safetensors", "anysplat/model.safetensors",
            "anysplat_stitched.pth", "vist3a.json", "layer_search.json"} <= set(manifest["files"])
    config = json.loads((model_dir / "vist3a.json").read_text())
    assert config["stitching"]["stitching_layer_location"] == records["layer_search"]["block"]
    model = Vist3A.load(model_dir)
    result = model.generate("a red cube left of a blue sphere", num_steps=3)
    assert result.frames.shape[2] == 5 and torch.isfinite(result.scene.means).all()
    # the merged reward LoRA changed the transformer relative to the pre-reward folder
    before = Vist3A.load(folder / "assemble" / "pre_reward")
    a, b = (dict(m.generator.transformer.named_parameters()) for m in (model, before))
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_closed_vocabulary_warns_about_unknown_words(recipe):
    folder, _ = recipe
    model = Vist3A.load(folder / "assemble" / "model")
    with pytest.warns(UserWarning, match="does not know 1 word.*unicorn"):
        model.generate("a red unicorn", num_steps=2)


def test_a_second_run_skips_done_stages_and_redo_continues_training(recipe, tmp_path):
    import shutil

    folder, records = recipe
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    again = run_recipe(copy, stages="vae,recon")
    assert again["vae"]["finished"] == records["vae"]["finished"]  # not re-run
    extended = run_recipe(copy, stages="recon", overrides={"recon_budget": Budget(3)}, redo=["recon"])
    assert extended["recon"]["steps"] == 3  # resumed from step 2, not restarted
    assert not (copy / "stitch" / "done.json").exists()  # stages that need it reopened with it
    assert not (copy / "assemble" / "done.json").exists()
    assert all((copy / s / "done.json").exists() for s in ("vae", "latents", "denoiser", "classifier"))


def test_a_new_folder_reuses_matching_stages_and_warm_starts_others(recipe, tmp_path, capsys):
    import json

    folder, records = recipe
    new = tmp_path / "new"
    args = ["train", "nano", "--out", str(new), "--reuse-from", str(folder), "--warm-start", "recon",
            "--set", "recon_render_every=2", "--budget", "recon=3",  # the source's settings, but these
            "--stages", "vae,latents,denoiser,recon,layer_search,classifier"]
    assert main(args) == 0
    done = {s: json.loads((new / s / "done.json").read_text()) for s in ("vae", "denoiser", "recon", "layer_search")}
    for stage in ("vae", "latents", "denoiser", "classifier"):  # same settings, same inputs: copied, not re-run
        record = json.loads((new / stage / "done.json").read_text())
        assert record["reused_from"] == str(folder.resolve()) and record["finished"] == records[stage]["finished"]
    assert "reused_from" not in done["recon"]  # its settings changed: trained on from the source's state
    assert done["recon"]["steps"] == 3 and done["recon"]["warm_start"].endswith("recon/state.pt")
    assert "reused_from" not in done["layer_search"]  # it needs the new recon
    assert json.loads((new / "recipe.json").read_text())["settings"]["recon_render_every"] == 2
    assert main(["train", "nano", "--out", str(tmp_path / "x"), "--warm-start", "recon"]) == 2
    assert main(["train", "nano", "--out", str(tmp_path / "z"), "--reuse-from", str(folder),
                 "--warm-start", "layer_search"]) == 2  # no state to start from: nothing written
    assert "cannot warm-start 'layer_search'" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert main(["train", "nano", "--out", str(tmp_path / "y"), "--set", "recon_frames"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_settings_and_stage_errors(recipe, tmp_path):
    folder, _ = recipe
    with pytest.raises(Vist3AInputError, match="shape the result"):
        run_recipe(folder, overrides={"vae_lr": 1.0})
    with pytest.raises(Vist3AInputError, match="unknown stages"):
        run_recipe(folder, stages="vae,painting")
    fresh = tmp_path / "fresh"
    with pytest.raises(Vist3AInputError, match="needs \\['vae'\\]"):
        run_recipe(fresh, RecipeSettings(preset="micro"), stages="latents")
    with pytest.raises(Vist3AInputError, match="budget steps"):
        Budget(-1)


def test_cli_budget_errors_exit_2(tmp_path, capsys):
    assert main(["train", "nano", "--out", str(tmp_path / "r"), "--budget", "vae=lots"]) == 2
    assert "STAGE=STEPS[:MINUTES]" in capsys.readouterr().err
    assert main(["train", "recon", "--out", str(tmp_path / "r"), "--budget", "x:y"]) == 2


def test_install_embedded_and_load_nano(recipe, tmp_path, monkeypatch):
    import vist3a_rt.models as models
    from vist3a_rt.training.nano.assemble import install_embedded

    folder, _ = recipe
    monkeypatch.setattr(models, "embedded_model_dir", lambda name="nano": tmp_path / "pkg" / name)
    with pytest.raises(CheckpointError, match="not installed"):
        Vist3A.load("nano")
    with pytest.raises(Vist3AInputError, match="not an assembled nano model"):
        install_embedded(tmp_path)
    install_embedded(folder / "assemble" / "model")
    install_embedded(folder / "assemble" / "model")  # replacing an installed one
    assert Vist3A.load("nano").generate("a green cone", num_steps=2).scene is not None
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["nano"]


def test_stage_and_install_commands(recipe, tmp_path, monkeypatch, capsys):
    import shutil

    import vist3a_rt.models as models

    folder, _ = recipe
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert main(["train", "recon", "--out", str(copy), "--budget", "3", "--redo"]) == 0
    assert json.loads((copy / "recon" / "done.json").read_text())["steps"] == 3
    assert '"steps": 3' in capsys.readouterr().out
    monkeypatch.setattr(models, "embedded_model_dir", lambda name="nano": tmp_path / "pkg" / name)
    assert main(["train", "install", str(tmp_path / "nowhere")]) == 2
    assert main(["train", "install", str(folder / "assemble" / "model")]) == 0
    assert (tmp_path / "pkg" / "nano" / "manifest.json").is_file()
