"""The bundle's on-disk layout and its manifest: what ``vist3a-rt export`` writes and the runtime reads.

A bundle is a directory::

    manifest.json                       written last; "format": "vist3a-rt/bundle" marks a bundle
    weights/<component>.safetensors     text_encoder, transformer (LoRA merged), vae, stitched_decoder
                                        (LoRA merged); memory-mappable state dicts, tied tensors stored
                                        once (the metadata's "aliases" names the other keys)
    onnx/<stage>.<precision>.<key>.onnx one graph per stage (+ its export sidecar ``.json``, and
                                        ``.onnx.data`` when the weights are stored outside the graph);
                                        the denoiser is two: ``denoiser_context`` (the text's
                                        cross-attention keys and values, once per prompt) and
                                        ``denoiser`` (one step on them), see ``export/denoiser_split.py``
    text/negative_prompt.safetensors    the default negative prompt's embedding [L, D] (float32)
    tokenizer/tokenizer.json            the fast-tokenizer file (+ tokenizer_config.json)
    scheduler/scheduler_config.json     the source model's scheduler config, as released
    engines/*.plan                      TensorRT engines (``export/tensorrt_build.py``; kept across
                                        re-exports, each plan's own record says whether it still fits)

The manifest (``format_version`` 2; version 1 had one denoiser graph on the raw text) holds:

* ``family``, ``precision``, ``created_with`` (tool versions, vist3a-rt git commit);
* ``source``: what was exported (path, sha256 of every source file, their combined digest);
* ``generation``: the default settings and the fixed sizes the graphs were exported for
  (``num_frames``, ``height``, ``width``, ``frame_size`` of the stitched decoder's input,
  ``max_sequence_length``), ``closed_vocabulary``;
* ``configs``: every stage's model config (transformers / diffusers config dicts, the decoder's
  ``DecoderConfig``) and ``classes`` (which library class each weights file belongs to);
* ``latents``: the VAE latent statistics (``mean``, ``std``) and the VAE's compression factors;
* ``stages``: per stage the ONNX file (and external-data file), its files, precision, exporter,
  key and contract (also in the exporter's sidecar ``.json`` beside the graph);
* ``artifacts``: per file, its sha256, size and the key of the inputs it was made from (the
  exporter skips a step whose file still has that key and hash);
* ``negative_prompt``: the text whose embedding is cached.

Nothing here imports onnx, onnxruntime, diffusers or transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError

FORMAT = "vist3a-rt/bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STAGES = ("text_encoder", "denoiser_context", "denoiser", "vae_decoder", "stitched_decoder")
WEIGHTS = ("text_encoder", "transformer", "vae", "stitched_decoder")
PRECISIONS = ("fp32", "fp16", "bf16")
NEGATIVE_PROMPT_FILE = "text/negative_prompt.safetensors"
TOKENIZER_DIR = "tokenizer"
SCHEDULER_FILE = "scheduler/scheduler_config.json"


def weights_file(component: str) -> str:
    return f"weights/{component}.safetensors"


def is_bundle(path) -> bool:
    """True when ``path`` is a directory whose manifest.json carries the bundle format marker."""
    try:
        manifest = Path(path) / MANIFEST
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def read_manifest(bundle: str | Path) -> dict:
    """The manifest of ``bundle``, checked for the marker, the version and the files it names."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{root} is not a vist3a-rt bundle: it has no {MANIFEST} "
                              "(an export that did not finish leaves none; run `vist3a-rt export` again)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vist3a-rt bundle manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{root} is a bundle of format version {manifest.get('format_version')}; this "
                              f"vist3a-rt reads version {FORMAT_VERSION}: re-export it with this version")
    missing = sorted(name for name in manifest.get("artifacts", {}) if not (root / name).is_file())
    if missing:
        raise CheckpointError(f"bundle {root} is missing {missing}; re-run `vist3a-rt export` to repair it")
    return manifest


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
