"""The models: one spec of a pipeline's facts, the families the attention patch knows, loading, experts, LoRA, and
the tiny model builder."""
