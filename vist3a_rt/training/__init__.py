"""Training utilities that produce a stitched VIST3A model (layer search, stitching, fine-tuning).

Nothing is imported here: each utility lives in its own module (``vist3a_rt.training.layer_search``,
``…adapters``, ``…cli``) and pulls in its heavy dependencies only when used.
"""
