"""Training BLIP-2 at full scale on real data, on one process or many (``python -m blip2_lite train``)."""
