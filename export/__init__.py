"""Lowering of the runtime's stages, installed as ``vist3a_rt.export``.

* ``spec`` — the contract vocabulary: ``Axis``, ``TensorSpec``, ``Profile`` (min / opt / max
  sizes), ``ExportContract``, ``ExportStage``;
* ``contracts`` — one contract and tensor-only wrapper module per stage (text encoder,
  denoiser, VAE decoder, stitched decoder), ``model_stages(model)`` for a loaded ``Vist3A``;
* ``onnx_export`` — ``export_onnx(stage, out_dir)``: dynamo exporter (TorchScript fallback),
  checks, shape inference, external data, content-addressed artifacts.

onnx, onnxscript and onnxruntime are imported only when an export or a check runs.
"""

from .contracts import (STAGES, denoiser_stage, model_stages, stitched_decoder_stage, text_encoder_stage,
                        vae_decoder_stage)
from .onnx_export import ExportError, OnnxArtifact, artifact_key, export_onnx
from .spec import Axis, ExportContract, ExportStage, ExportUnsupportedError, Profile, TensorSpec

__all__ = ["STAGES", "Axis", "TensorSpec", "Profile", "ExportContract", "ExportStage", "ExportUnsupportedError",
           "ExportError", "OnnxArtifact", "text_encoder_stage", "denoiser_stage", "vae_decoder_stage",
           "stitched_decoder_stage", "model_stages", "export_onnx", "artifact_key"]
