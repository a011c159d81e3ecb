"""``vist3a-rt train …``: command-line entry points of the training utilities (thin, over the API).

The group is ``train``; the top-level CLI registers it with ``cli.add_command(train)``. Heavy
imports (torch, diffusers, the models) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import Vist3AInputError

_FILE = click.Path(dir_okay=False, path_type=Path)
VAE_VIDEOS, NET_VIDEOS = "videos.vae_image_uint8", "videos.feedforward_image_uint8"


@click.group(name="train")
def train() -> None:
    """Training utilities: layer search, stitching, fine-tuning."""


@train.command("layer-search")
@click.option("--features", "features_file", type=_FILE,
              help="Precomputed latents + block features (safetensors: 'features.vae_latents_fp16' "
                   "[N,C,T_lat,h,w] and 'features.<block>' [N,T,P,E]). Replaces the model options.")
@click.option("--model-config", type=_FILE, help="Decoder config JSON (laid out like the fixtures' config.json).")
@click.option("--base-weights", type=click.Path(path_type=Path),
              help="The unstitched reconstruction network's weights (AnySplat model.safetensors or its folder).")
@click.option("--videos", "videos_file", type=_FILE,
              help="uint8 videos [N,3,T,H,W] (safetensors: 'videos.vae_image_uint8' and optionally "
                   "'videos.feedforward_image_uint8' at the network's resolution).")
@click.option("--vae", "vae_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A diffusers AutoencoderKLWan folder (config.json + weights).")
@click.option("--blocks", default="all", show_default=True, help="Candidate blocks, e.g. enc_blocks_1,enc_blocks_4.")
@click.option("--conv-spec", default=None,
              help="Stitching conv, e.g. conv3d_k5x3x3_o1024_s1x2x2_p2x1x1 (default: the model config's, or "
                   "the official kernel/stride/padding at the features' width).")
@click.option("--ridge", type=float, default=1e-4, show_default=True)
@click.option("--padding", type=click.Choice(["official", "consistent"]), default="official", show_default=True,
              help="official: fit on zero-padded patches, evaluate with the conv's replicate padding (as the "
                   "official code); consistent: replicate padding in both.")
@click.option("--batch-size", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the VAE posterior sampling.")
@click.option("--feature-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage precision of captured latents and features (official: float16).")
@click.option("--save-features", type=_FILE, default=None, help="Also write the captured features here.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def layer_search_command(features_file, model_config, base_weights, videos_file, vae_dir, blocks, conv_spec,
                         ridge, padding, batch_size, seed, feature_dtype, save_features, device, out_dir) -> None:
    """Fit the stitching conv for every candidate block, rank blocks by MSE, save the winner's init."""
    from .layer_search import LayerSearchFeatures, default_conv_spec, layer_search

    model_inputs = {"--model-config": model_config, "--base-weights": base_weights, "--videos": videos_file,
                    "--vae": vae_dir}
    candidates = None if blocks.strip().lower() == "all" else [b.strip() for b in blocks.split(",")]
    if features_file is not None:
        given = [name for name, value in model_inputs.items() if value is not None]
        if given:
            raise Vist3AInputError(f"--features replaces the model inputs; drop {', '.join(given)}")
        features = LayerSearchFeatures.load(features_file)
        inputs = {"features": str(features_file)}
        default_spec = default_conv_spec(next(iter(features.blocks.values())).shape[-1])
    else:
        features, default_spec = _capture(model_config, base_weights, videos_file, vae_dir, candidates,
                                          batch_size, seed, feature_dtype, device)
        inputs = {"videos": str(videos_file), "model_config": model_config and str(model_config),
                  "base_weights": str(base_weights), "vae": str(vae_dir), "seed": seed}
        if save_features is not None:
            click.echo(f"features: {features.save(save_features)}")
    result = layer_search(features, conv_spec or default_spec, blocks=candidates, ridge=ridge, padding=padding,
                          batch_size=batch_size, device=device)
    result.extra["inputs"] = inputs
    paths = result.save(out_dir)
    click.echo(result.table())
    click.echo(f"table: {paths['table']}\nstitching init ({result.best.block}): {paths['init']}")


def _capture(model_config, base_weights, videos_file, vae_dir, candidates, batch_size, seed, feature_dtype,
             device):
    """Latents and block features of the videos file, through the VAE and the network."""
    import torch

    from ..decoder.loading import load_reconstruction_model
    from .adapters import AnySplatFeatureSource, WanLatentSource
    from .layer_search import capture_features, video_batches

    missing = [name for name, value in (("--base-weights", base_weights), ("--videos", videos_file),
                                        ("--vae", vae_dir)) if value is None]
    if missing:
        raise Vist3AInputError(f"give --features, or the model inputs (missing: {', '.join(missing)})")
    vae_videos, feedforward_videos = _read_videos(videos_file)
    model = load_reconstruction_model(model_config, base_weights, device=device)
    latent_source = WanLatentSource.from_pretrained(vae_dir, torch.Generator(device).manual_seed(seed), device)
    features = capture_features(latent_source, AnySplatFeatureSource(model),
                                ((a.to(device), b.to(device)) for a, b in
                                 video_batches(vae_videos, feedforward_videos, batch_size)),
                                blocks=candidates, feature_dtype=getattr(torch, feature_dtype))
    return features, model.config.stitching.stitching_layer_config


def _read_videos(path: Path):
    """(VAE videos, network videos or None) from the fixture-style keys; other keys are not read."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise Vist3AInputError(f"videos file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if VAE_VIDEOS not in keys:
                raise Vist3AInputError(f"{path} has no '{VAE_VIDEOS}' [N,3,T,H,W] tensor "
                                       f"(keys: {sorted(keys)[:6]})")
            return f.get_tensor(VAE_VIDEOS), f.get_tensor(NET_VIDEOS) if NET_VIDEOS in keys else None
    except SafetensorError as err:
        raise Vist3AInputError(f"{path} is not a readable safetensors file: {err}") from None


@train.command("nano")
@click.option("--out", "work_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The recipe's working folder (created; an existing one is resumed).")
@click.option("--stages", default="all", show_default=True,
              help="Comma-separated stages to run (in recipe order): vae, latents, denoiser, recon, "
                   "layer_search, stitch, classifier, reward, assemble.")
@click.option("--redo", default=None, help="Reopen these stages (and every stage that depends on them) to train them further.")
@click.option("--budget", "budgets", multiple=True, metavar="STAGE=STEPS[:MINUTES]",
              help="Step budget (total) and optional time budget (this run) of a training stage.")
@click.option("--threads", type=int, default=None, help="torch threads for this process (default: the recipe's, 1).")
@click.option("--seed", type=int, default=None, help="Seed of a new recipe folder (default 0).")
@click.option("--preset", type=click.Choice(["nano", "micro"]), default=None, help="Model sizes of a new folder.")
@click.option("--set", "settings", multiple=True, metavar="KEY=JSON",
              help="A recipe setting of a new folder (e.g. recon_render_every=2, recon_frames=[2,6]).")
@click.option("--reuse-from", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Another recipe folder: copy its finished stages whose settings (and inputs) match.")
@click.option("--warm-start", default=None,
              help="Comma-separated stages whose training state is copied from --reuse-from and trained on.")
def nano_command(work_dir, stages, redo, budgets, threads, seed, preset, settings, reuse_from, warm_start) -> None:
    """The VIST3A-nano recipe end to end, resumable per stage."""
    from .nano.recipe import run_recipe
    from .nano.workspace import Budget

    overrides: dict = {}
    for text in budgets:
        stage, _, value = text.partition("=")
        steps, _, minutes = value.partition(":")
        try:
            overrides[f"{stage.strip()}_budget"] = Budget(int(steps), float(minutes) if minutes else None)
        except ValueError:
            raise Vist3AInputError(f"--budget must look like STAGE=STEPS[:MINUTES], got {text!r}") from None
    for name, value in (("threads", threads), ("seed", seed), ("preset", preset)):
        if value is not None:
            overrides[name] = value
    overrides.update(_parse_settings(settings))
    records = run_recipe(work_dir, stages=stages, overrides=overrides, redo=redo.split(",") if redo else None,
                         reuse_from=reuse_from, warm_start=warm_start.split(",") if warm_start else None)
    for stage, record in records.items():
        shown = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and k not in ("commit", "host")}
        click.echo(f"{stage}: {json.dumps(shown)}")


def _parse_settings(items) -> dict:
    parsed = {}
    for text in items:
        key, sep, value = text.partition("=")
        if not sep:
            raise Vist3AInputError(f"--set must look like KEY=VALUE, got {text!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value  # a bare string
    return parsed


def _stage_command(stage: str):
    @click.option("--out", "work_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="The nano recipe's working folder (its earlier stages must be done).")
    @click.option("--budget", default=None, metavar="STEPS[:MINUTES]",
                  help="Step budget (total) and optional time budget (this run) of the stage.")
    @click.option("--threads", type=int, default=None, help="torch threads for this process.")
    @click.option("--redo", is_flag=True, help="Reopen the stage (and the stages that depend on it) to train it further.")
    def command(work_dir, budget, threads, redo) -> None:
        from .nano.recipe import run_recipe
        from .nano.workspace import Budget

        overrides: dict = {} if threads is None else {"threads": threads}
        if budget is not None:
            steps, _, minutes = budget.partition(":")
            try:
                overrides[f"{stage}_budget"] = Budget(int(steps), float(minutes) if minutes else None)
            except ValueError:
                raise Vist3AInputError(f"--budget must look like STEPS[:MINUTES], got {budget!r}") from None
        record = run_recipe(work_dir, stages=[stage], overrides=overrides, redo=[stage] if redo else None)[stage]
        shown = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and k not in ("commit", "host")}
        click.echo(f"{stage}: {json.dumps(shown)}")

    command.__doc__ = f"Run the nano recipe's {stage!r} stage on a recipe folder (see `train nano`)."
    return command


for _stage, _help in (("vae", "Train the Wan VAE on world clips."),
                      ("denoiser", "Train the text encoder + Wan transformer (flow matching) on VAE latents."),
                      ("recon", "Train the AnySplat-architecture reconstruction network from scratch."),
                      ("stitch", "Distil the network into the stitched decoder (latents in), from layer search."),
                      ("reward", "Reward-finetune the denoiser (LoRA) through the stitched decoder.")):
    train.command(_stage, help=_help + " One stage of `train nano`, resumable.")(_stage_command(_stage))


@train.command("install")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
def install_command(model_dir) -> None:
    """Copy an assembled nano model (RECIPE/assemble/model) into the package as the embedded model."""
    from .nano.assemble import install_embedded

    click.echo(f"installed: {install_embedded(model_dir)}")
