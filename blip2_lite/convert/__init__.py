"""Checkpoint conversion: one rename engine and strict loader (``engine``), one module per source layout
(``hf``: Hugging Face, ``lavis``: LAVIS, ``efficientnet``: the EfficientNet-Lite0 package, ``bert``: the
Q-Former's BERT initialisation), and ``pretrained``: ``from_pretrained`` with hub resolution."""
