"""The model shape the core needs, independent of where the weights come from."""
from dataclasses import dataclass, field

# Architectures whose attention always carries q/k/v biases, whatever their config says.
_QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}
_QK_NORM_ARCHITECTURES = {"Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Hugging Face form; its "rope_type" names the scaling
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    o_proj_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2's q/k/v bias does not
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        architecture = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        num_heads = d["num_attention_heads"]
        # transformers 5 folds rope_theta and the scaling into rope_parameters.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) or architecture in _QKV_BIAS_ARCHITECTURES,
            o_proj_bias=bool(d.get("attention_bias", False)) and architecture not in _QKV_BIAS_ARCHITECTURES,
            qk_norm=architecture in _QK_NORM_ARCHITECTURES,
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
        )
