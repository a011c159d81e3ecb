"""The AnySplat-architecture reconstruction network and VIST3A's stitched decoder."""

from .config import DecoderConfig
from .loading import load_reconstruction_model, load_stitched_decoder
from .network import DecoderOutput, ReconstructionModel, StitchedDecoder

__all__ = ["DecoderConfig", "DecoderOutput", "ReconstructionModel", "StitchedDecoder",
           "load_reconstruction_model", "load_stitched_decoder"]
