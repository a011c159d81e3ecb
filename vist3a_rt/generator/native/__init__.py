"""Pure-torch implementations of the Wan 2.1 generator's pieces (no diffusers / transformers import)."""
