"""A deterministic stand-in for ``plugserve.engine.LLMEngine`` for server tests.

It implements the engine interface the server relies on (add_request,
abort_request, step, has_unfinished_requests, stats, tokenizer, model_name,
max_model_len, platform_name, device_description) without a model: every
"token" is a word from a tiny vocabulary, chosen by a rule that depends only on
the prompt (greedy) or on seed + choice index (seeded), so tests can predict
and compare outputs.  KV "blocks" are bookkept per request so tests can check
that finished and aborted requests free them.

Special behaviour triggered by prompt words:
  ``boom``  -> step() raises an error tagged with that request's id
  ``bye``   -> the fake emits EOS after 3 tokens (finish_reason "stop")
"""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field

from plugserve.outputs import CompletionOutput, RequestOutput

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
         "hello world the a is of to and boom bye say count story tell me please").split()
# Words the fake "model" generates: a fixed cycle, so greedy output is predictable.
GEN_WORDS = WORDS[:26]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A real ``PreTrainedTokenizerFast`` over a whitespace word-level vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


class FakeStepError(RuntimeError):
    def __init__(self, request_id: str):
        super().__init__(f"injected failure for {request_id}")
        self.request_id = request_id  # lets the server fail only this request


@dataclass
class _Choice:
    index: int
    rng: random.Random | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    text: str = ""


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: object
    choices: list[_Choice]
    blocks: int = 0


class FakeEngine:
    model_name = "fake-model"
    platform_name = "fake"
    device_description = "fake device (tests)"

    def __init__(self, max_model_len: int = 256, max_num_seqs: int = 32, num_blocks: int = 4096,
                 block_size: int = 4, step_delay: float = 0.0):
        self.tokenizer = build_tokenizer()
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_blocks, self.block_size = num_blocks, block_size
        self.step_delay = step_delay
        self.eos_id = self.tokenizer.eos_token_id
        self._gen_ids = [self.tokenizer.convert_tokens_to_ids(w) for w in GEN_WORDS]
        self.waiting: list[_Req] = []
        self.running: dict[str, _Req] = {}
        self.blocks_used = 0
        self.num_aborted = 0
        self.added: list[str] = []
        self._owner: threading.Thread | None = None  # engine must only be driven by one thread

    # ---------------------------------------------------------------- interface
    def add_request(self, request_id, prompt, params) -> None:
        self._check_thread()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < len(self.tokenizer) for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {len(self.tokenizer)})")
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) > {self.max_model_len}")
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise ValueError(f"duplicate request id {request_id}")
        greedy = params.temperature == 0
        choices = []
        for i in range(params.n):
            rng = None if greedy else random.Random(params.seed + i if params.seed is not None else None)
            choices.append(_Choice(i, rng, logprobs=[] if params.logprobs is not None else None))
        self.waiting.append(_Req(request_id, ids, params, choices))
        self.added.append(request_id)

    def abort_request(self, request_id) -> None:
        self._check_thread()
        req = self.running.pop(request_id, None)
        if req is None:
            for r in self.waiting:
                if r.request_id == request_id:
                    self.waiting.remove(r)
                    req = r
                    break
        if req is not None:
            self.num_aborted += 1
            self._free(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        self._check_thread()
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.pop(0)
            self.running[req.request_id] = req
        for req in self.running.values():
            if self.tokenizer.convert_tokens_to_ids("boom") in req.prompt_ids:
                raise FakeStepError(req.request_id)
        outputs = []
        for req in list(self.running.values()):
            for c in req.choices:
                if c.finish_reason is None:
                    self._generate_one(req, c)
            self._resize_blocks(req)
            finished = all(c.finish_reason is not None for c in req.choices)
            outputs.append(RequestOutput(req.request_id, list(req.prompt_ids),
                                         [self._output(req, c) for c in req.choices], finished))
            if finished:
                del self.running[req.request_id]
                self._free(req)
        return outputs

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv_cache_usage": self.blocks_used / self.num_blocks, "prefix_cache_hit_rate": 0.0,
                "num_kv_blocks_used": self.blocks_used}

    # ---------------------------------------------------------------- internals
    def _check_thread(self) -> None:
        me = threading.current_thread()
        if self._owner is None:
            self._owner = me
        assert self._owner is me, "engine called from two threads"

    def _generate_one(self, req: _Req, c: _Choice) -> None:
        p = req.params
        pos = len(c.token_ids)
        if c.rng is None:  # greedy: continue a cycle that starts where the prompt says
            k = (sum(req.prompt_ids) + pos) % len(self._gen_ids)
        else:
            k = c.rng.randrange(len(self._gen_ids))
        tid = self._gen_ids[k]
        if (self.tokenizer.convert_tokens_to_ids("bye") in req.prompt_ids and pos == 3
                and not p.ignore_eos):
            tid = self.eos_id
        c.token_ids.append(tid)
        if c.logprobs is not None:
            lp = -0.1 * (1 + k % 5)
            alts = [(tid, lp)] + [(self._gen_ids[(k + j) % len(self._gen_ids)], lp - j)
                                  for j in range(1, p.logprobs)]
            c.logprobs.append({"token_id": tid, "logprob": lp, "top_logprobs": alts[:p.logprobs]})
        if tid == self.eos_id or tid in p.stop_token_ids:
            c.finish_reason = "stop"
        text = self.tokenizer.decode(c.token_ids, skip_special_tokens=p.skip_special_tokens)
        for s in p.stop:
            at = text.find(s)
            if at >= 0:
                c.text, c.finish_reason = text[:at + (len(s) if p.include_stop_str_in_output else 0)], "stop"
                return
        c.text = text
        max_tokens = p.max_tokens or (self.max_model_len - len(req.prompt_ids))
        if c.finish_reason is None and len(c.token_ids) >= max_tokens:
            c.finish_reason = "length"

    def _output(self, req: _Req, c: _Choice) -> CompletionOutput:
        text = c.text
        if c.finish_reason is None:  # hold back a possible stop-string prefix, like the engine
            hold = max((n for s in req.params.stop for n in range(1, len(s))
                        if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        return CompletionOutput(c.index, text, list(c.token_ids), c.finish_reason,
                                None if c.logprobs is None else list(c.logprobs))

    def _resize_blocks(self, req: _Req) -> None:
        tokens = len(req.prompt_ids) + sum(len(c.token_ids) for c in req.choices)
        need = math.ceil(tokens / self.block_size)
        self.blocks_used += need - req.blocks
        req.blocks = need

    def _free(self, req: _Req) -> None:
        self.blocks_used -= req.blocks
        req.blocks = 0
