"""The frozen image encoders: ``timm_encoder`` (any timm model; the lite world's EfficientNet-Lite0),
``eva`` (EVA ViT-g, BLIP-2's full-scale encoder), and ``images`` (loading and preprocessing)."""
