"""The lite world, everything that exists only to run BLIP-2 offline on a CPU: the shapes world, the
feature cache, the lite LLMs, all presets, and the stage-1 / stage-2 recipes the course calls."""

from .presets import STAGE1_PRESETS, STAGE2_PRESETS
from .stage1_recipe import run_stage1
from .stage2_recipe import run_stage2
from .world import LiteWorld, load_lite_world

__all__ = ["STAGE1_PRESETS", "STAGE2_PRESETS", "LiteWorld", "load_lite_world", "run_stage1", "run_stage2"]
