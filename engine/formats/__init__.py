"""Checkpoint formats as reader/writer pairs. Megatron-Core's `torch_dist` lives here; the older formats
(safetensors, torch zip rank files, DCP) move in later."""
