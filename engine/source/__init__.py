"""What is read, shown as tensors: Hugging Face and Megatron sources, and the views that convert while reading
(FP8, casts, fused experts).
"""
