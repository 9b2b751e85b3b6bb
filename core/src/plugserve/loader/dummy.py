"""Random weights for a model shape: for benchmarks and tests that need no real checkpoint."""
import torch

from plugserve.loader import ModelLoadError, ModelSource
from plugserve.loader.hf import load_tokenizer, read_config
from plugserve.models.config import ModelConfig

_SEED = 0


def _weights(c: ModelConfig):
    gen = torch.Generator().manual_seed(_SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    def norm(n):  # near 1, so activations keep their scale through the layers
        return 1.0 + 0.01 * torch.randn(n, generator=gen)

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    yield "model.embed_tokens.weight", randn(c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(c.hidden_size)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield f"{p}self_attn.{name}.weight", randn(rows, c.hidden_size)
            if c.attention_bias:
                yield f"{p}self_attn.{name}.bias", randn(rows)
        yield p + "self_attn.o_proj.weight", randn(c.hidden_size, q)
        if c.o_proj_bias:
            yield p + "self_attn.o_proj.bias", randn(c.hidden_size)
        if c.qk_norm:
            yield p + "self_attn.q_norm.weight", norm(c.head_dim)
            yield p + "self_attn.k_norm.weight", norm(c.head_dim)
        yield p + "post_attention_layernorm.weight", norm(c.hidden_size)
        yield p + "mlp.gate_proj.weight", randn(c.intermediate_size, c.hidden_size)
        yield p + "mlp.up_proj.weight", randn(c.intermediate_size, c.hidden_size)
        yield p + "mlp.down_proj.weight", randn(c.hidden_size, c.intermediate_size)
    yield "model.norm.weight", norm(c.hidden_size)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", randn(c.vocab_size, c.hidden_size)


def load(path: str | None, config: dict | None) -> ModelSource:
    """Shape from ``config`` (a Hugging Face config dict) or else from ``path``'s config.json."""
    if config is not None:
        try:
            model_config = ModelConfig.from_hf_dict(config)
        except KeyError as e:
            raise ModelLoadError(f"dummy model config lacks {e}") from e
        tokenizer = None
    elif path is not None:
        model_config, tokenizer = read_config(path), load_tokenizer(path)
    else:
        raise ModelLoadError("load_format='dummy' needs a config dict or a Hugging Face folder for the shape")
    template = getattr(tokenizer, "chat_template", None)
    return ModelSource(model_config, _weights(model_config), tokenizer, template, model_config.eos_token_ids, path)
