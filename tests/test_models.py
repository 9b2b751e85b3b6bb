"""The Llama-family model against Hugging Face transformers, run through the paged reference attention."""
import math
import os

import pytest
import torch
import transformers
from plugserve_plugin_api import (AttentionBatch, AttentionSpec, Detection, MemoryInfo, Platform, PlatformConfig,
                                  ReferenceAttention)

from plugserve.loader import default_model_path, load_model_source
from plugserve.models import MODEL_REGISTRY

BLOCK_SIZE = 16


class _TestCpuPlatform(Platform):
    name = "test-cpu"
    api_requires = ">=1.0,<2"
    device_type = "cpu"
    supported_dtypes = (torch.float32, torch.bfloat16)
    default_dtype = torch.float32

    @classmethod
    def detect(cls):
        return Detection(usable=True)

    def init_device(self, rank=0):
        return torch.device("cpu")

    def describe_device(self):
        return "cpu"

    def memory_info(self):
        return MemoryInfo(total=0, free=0, used=0)

    def attention_backends(self):
        return [ReferenceAttention]


def build_model(source, dtype=torch.float32):
    c = source.config
    spec = AttentionSpec(c.num_heads, c.num_kv_heads, c.head_dim, dtype, BLOCK_SIZE)
    model = MODEL_REGISTRY[c.architecture](
        c, _TestCpuPlatform(), PlatformConfig(dtype=dtype, block_size=BLOCK_SIZE, quantization="none"), "cpu",
        ReferenceAttention(spec))
    model.load_weights(source.weights)
    return model


@torch.inference_mode()
def run_steps(model, steps: list[list[int]]) -> torch.Tensor:
    """Run one sequence step by step (a prefill, then more chunks or single-token decodes) through a
    paged cache with sequential blocks; return the logits of every token, [sum(len), vocab]."""
    total = sum(len(s) for s in steps)
    num_blocks = math.ceil(total / BLOCK_SIZE)
    caches = [torch.zeros(model.attn.kv_cache_shape(num_blocks), dtype=model.dtype) for _ in model.layers]
    block_table = torch.arange(num_blocks).unsqueeze(0)
    logits, start = [], 0
    for tokens in steps:
        n, end = len(tokens), start + len(tokens)
        positions = torch.arange(start, end)
        batch = AttentionBatch(
            query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([end]), block_tables=block_table,
            slot_mapping=positions,  # block i holds positions i*B..(i+1)*B-1, so slot == position
            query_lens_cpu=[n], seq_lens_cpu=[end])
        hidden = model(torch.tensor(tokens), positions, caches, model.attn.prepare(batch))
        logits.append(model.compute_logits(hidden))
        start = end
    return torch.cat(logits)


@torch.inference_mode()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([tokens])).logits[0].float()


# -- SmolLM2 GGUF -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_pair():
    path = default_model_path()
    source = load_model_source(path)
    ours = build_model(source)
    return ours, _transformers_gguf_model(path), source.tokenizer


def _transformers_gguf_model(path):
    """transformers' own reading of the GGUF (its dequantisation and q/k un-permutation), in fp32.

    Assembled by hand because from_pretrained(gguf_file=...) insists on `accelerate`, which is not a
    dependency; building on the meta device skips a pointless random init."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    # buffers (rotary inv_freq) are still on meta: rebuild them on cpu
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def test_smollm2_gguf_logits_match_transformers(smollm_pair):
    ours, theirs, tok = smollm_pair
    long_text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(40))  # 740 tokens
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    prompts = ["Hello", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", chat, long_text]
    lengths = []
    for prompt in prompts:
        ids = tok(prompt).input_ids
        lengths.append(len(ids))
        diff = (run_steps(ours, [ids]) - hf_logits(theirs, ids)).abs().max().item()
        assert diff < 1e-3, f"{len(ids)}-token prompt {prompt[:30]!r}: max |diff| {diff}"
    assert max(lengths) > 700


def test_smollm2_decode_steps_match_prefill(smollm_pair):
    ours, theirs, tok = smollm_pair
    ids = tok("The history of the Roman Empire begins").input_ids
    stepwise = run_steps(ours, [ids[:4]] + [[t] for t in ids[4:]])
    assert (stepwise - hf_logits(theirs, ids)).abs().max().item() < 1e-3


# -- tiny random models of every architecture -----------------------------------------------------

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}

ARCHITECTURES = {
    "llama-rope-llama3-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                 dict(rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama-rope-linear-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                               dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                    tie_word_embeddings=True)),
    "llama-rope-dynamic": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                           dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-attention-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2-qkv-bias-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                      dict(head_dim=32, tie_word_embeddings=False)),
}


def make_tiny_hf_model(kind: str, folder, **save_kwargs):
    """A random transformers model saved as a Hugging Face folder; weights scaled so logits are O(1)."""
    config_cls, model_cls, extra = ARCHITECTURES[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**_TINY, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]) if "embed" not in name else 1.0)
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_tiny_architecture_matches_transformers(kind, tmp_path):
    theirs = make_tiny_hf_model(kind, tmp_path)
    ours = build_model(load_model_source(str(tmp_path)))
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(theirs, ids)
    assert ref.abs().max() > 1  # the comparison below is meaningful only for logits of some size
    assert (run_steps(ours, [ids]) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["qwen3-qk-norm", "llama-rope-llama3-untied"])
def test_prefill_chunks_and_decode_steps_match_full_sequence(kind, tmp_path):
    theirs = make_tiny_hf_model(kind, tmp_path, max_shard_size="100KB")  # sharded: exercises the index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = build_model(load_model_source(str(tmp_path)))
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    steps = [ids[:21], ids[21:30]] + [[t] for t in ids[30:]]  # prefill, a chunk after a cached prefix, decodes
    assert (run_steps(ours, steps) - hf_logits(theirs, ids)).abs().max().item() < 1e-4


def test_dummy_model_runs(tmp_path):
    config = dict(_TINY, architectures=["Qwen3ForCausalLM"], head_dim=16, tie_word_embeddings=True)
    logits = run_steps(build_model(load_model_source(None, "dummy", dummy_config=config), torch.bfloat16),
                       [[1, 2, 3, 4], [5]])
    assert logits.shape == (5, 256) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
