"""Models: Qwen2 / Llama-3 in Flax NNX, their configs and HF weight I/O."""
from iopo_jax.models.config import LoRAConfig, ModelConfig, UnsupportedConfigError
from iopo_jax.models.transformer import KVCache, Transformer, padding_inputs
from iopo_jax.models.safetensors_io import CheckpointError
from iopo_jax.models.weights import export_hf, load_model

__all__ = ["LoRAConfig", "ModelConfig", "UnsupportedConfigError", "KVCache", "Transformer", "padding_inputs",
           "CheckpointError", "export_hf", "load_model"]
