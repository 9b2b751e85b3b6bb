"""Model architectures, keyed by the Hugging Face ``architectures`` name."""
from plugserve.models.config import ModelConfig
from plugserve.models.llama import LlamaForCausalLM

# One implementation covers the family; the config says which variant (bias, q/k norm, rope scaling).
MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "ModelConfig"]

