"""The built-in default: a tiny Qwen2.5-Omni thinker (model.py) and the synthetic world it learns
from (world.py: what an item is; render.py: how it looks and sounds; tasks.py: the training
batches drawn from it). Nothing here is needed to train a real backbone."""
