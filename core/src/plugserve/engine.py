"""The engine: requests in, one scheduling step at a time, outputs out.

Lifecycle (ARCHITECTURE.md, section 3): load plugins, select the platform, let it
validate the config, initialise the device, load the model, size the KV cache
from the memory budget, then serve steps.
"""
import math
import time
from dataclasses import dataclass, field

import torch

from plugserve_plugin_api import AttentionSpec, PlatformConfig

from plugserve.config import EngineConfig, parse_dtype
from plugserve.detokenizer import IncrementalDetokenizer, StopChecker
from plugserve.kv_cache import BlockManager
from plugserve.loader import load_model_source
from plugserve.models import MODEL_REGISTRY
from plugserve.outputs import CompletionOutput, RequestOutput
from plugserve.platforms import load_registry
from plugserve.runner import ModelRunner
from plugserve.sampler import SampledToken, Sampler, SamplerRow
from plugserve.sampling_params import SamplingParams
from plugserve.scheduler import Scheduler
from plugserve.sequence import Sequence, SequenceStatus

__all__ = ["LLMEngine", "CompletionOutput", "RequestOutput"]


@dataclass
class _Completion:
    """One of a request's n completions, tied to the Sequence that produces it."""
    index: int
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    stop: StopChecker
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion] = field(default_factory=list)
    pending_forks: list[_Completion] = field(default_factory=list)  # n > 1: wait for the prompt's KV
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return not self.pending_forks and all(c.finish_reason for c in self.completions)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        registry = load_registry()
        self.platform = registry.select(config.platform)
        source = load_model_source(config.model, config.load_format, config.dummy_config)
        mc = source.config
        max_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.platform_config = self.platform.validate_config(PlatformConfig(
            dtype=parse_dtype(config.dtype), block_size=config.block_size, quantization=config.quantization,
            max_num_seqs=config.max_num_seqs, max_model_len=max_len))
        self.max_model_len = max_len
        self.device = self.platform.init_device(0)
        self.platform.seed(config.seed)
        self.model_config = mc
        self.tokenizer = source.tokenizer
        self.model_name = config.served_model_name or _model_name(config, source)
        self.platform_name = self.platform.name
        self.device_description = self.platform.describe_device()

        block_size = self.platform_config.block_size
        spec = AttentionSpec(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.platform_config.dtype, block_size)
        self.attention_backend = _choose_backend(registry.attention_backends(self.platform), spec, self.platform.name)
        models = {**MODEL_REGISTRY, **registry.models()}
        if mc.architecture not in models:
            raise ValueError(f"model architecture {mc.architecture!r} is not supported; "
                             f"supported: {', '.join(sorted(models))}")
        self.model = models[mc.architecture](mc, self.platform, self.platform_config, self.device,
                                             self.attention_backend)
        self.model.load_weights(source.weights)

        num_blocks = self._num_kv_blocks(spec, mc.num_layers)
        self.kv_caches = [torch.zeros(self.attention_backend.kv_cache_shape(num_blocks), dtype=spec.dtype,
                                      device=self.device) for _ in range(mc.num_layers)]
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.chunked_prefill_size)
        self.runner = ModelRunner(self.model, self.attention_backend, self.kv_caches, block_size, self.device)
        self.eos_token_ids = list(source.eos_token_ids or mc.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[str, tuple[_Request, _Completion]] = {}

    # ---------------------------------------------------------------- set-up
    def _num_kv_blocks(self, spec: AttentionSpec, num_layers: int) -> int:
        bytes_per_block = math.prod(self.attention_backend.kv_cache_shape(1)) * spec.dtype.itemsize * num_layers
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = int(self.platform.memory_info().free * self.config.kv_cache_memory_fraction)
        # No point holding more than every running sequence at full length, plus one block each for rounding.
        useful = self.config.max_num_seqs * (math.ceil(self.max_model_len / spec.block_size) + 1)
        num_blocks = min(budget // bytes_per_block, useful)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes; "
                             f"raise --kv-cache-memory")
        return int(num_blocks)

    def warmup(self) -> None:
        """Run one tiny request through every stage so the first real request pays no first-call costs."""
        self.add_request("__warmup__", [0, 1], SamplingParams(max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()

    # -------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: "str | list[int]", params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_ids)} tokens and max_tokens is {max_tokens} "
                             f"({len(prompt_ids) + max_tokens} in all)")
        request = _Request(request_id, prompt_ids, params)
        for i in range(params.n):
            child_params = params.clone_for_child(i) if params.n > 1 else params
            seq = Sequence(f"{request_id}#{i}", prompt_ids, child_params)
            completion = _Completion(i, seq, child_params, _generator(child_params, self.device),
                                     self._detokenizer(prompt_ids, child_params),
                                     StopChecker(child_params.stop, child_params.include_stop_str_in_output),
                                     logprobs=[] if child_params.logprobs is not None else None)
            (request.completions if i == 0 else request.pending_forks).append(completion)
        self.scheduler.add(request.completions[0].seq, max_tokens)  # raises if it can never fit the KV pool
        for c in request.completions + request.pending_forks:
            self._by_seq[c.seq.seq_id] = (request, c)
        self.requests[request_id] = request

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for c in request.completions + request.pending_forks:
            self.scheduler.abort(c.seq.seq_id)
            self._by_seq.pop(c.seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompt token ids")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        logits = self.runner.run(out.scheduled)
        self.scheduler.postprocess(out)
        sampled = [item.seq for item in out.scheduled if item.sampled]
        rows, row_logits, completions = [], [], []
        for i, seq in enumerate(sampled):
            request, completion = self._by_seq[seq.seq_id]
            for c in [completion, *self._fork_pending(request, seq)]:
                rows.append(SamplerRow(c.params, c.generator, c.seq.prompt_token_ids, c.seq.output_token_ids))
                row_logits.append(i)
                completions.append((request, c))
        # A step of prefill chunks that all end mid-prompt samples nothing.
        tokens = self.sampler(logits[row_logits], rows) if rows else []
        touched: dict[str, _Request] = {}
        for (request, c), token in zip(completions, tokens):
            self._append(c, token)
            touched[request.request_id] = request
        if self.config.debug_invariants:
            self.block_manager.check_invariants(list(self.scheduler.running))
        return [self._output(r) for r in touched.values()]

    def _fork_pending(self, request: _Request, parent: Sequence) -> list[_Completion]:
        """n > 1: once the prompt is computed, the other completions share its KV and sample from its logits."""
        if not request.pending_forks or parent is not request.completions[0].seq:
            return []
        forks, request.pending_forks = request.pending_forks, []
        for c in forks:
            self.scheduler.fork(parent, c.seq)
            request.completions.append(c)
        return forks

    def _append(self, c: _Completion, token: SampledToken) -> None:
        seq, params = c.seq, c.params
        seq.append_token(token.token_id)
        if c.logprobs is not None:
            c.logprobs.append({"token_id": token.token_id, "logprob": token.logprob,
                               "top_logprobs": token.top_logprobs or []})
        reason = None
        is_eos = token.token_id in self.eos_token_ids and not params.ignore_eos
        if is_eos or token.token_id in params.stop_token_ids:
            reason = "stop"
        elif c.detokenizer is not None:
            c.detokenizer.add(token.token_id)
            match = c.stop.check(c.detokenizer.text) if c.stop.stop else None
            if match is not None:
                c.text, reason = match.text, "stop"
            else:
                c.text = c.detokenizer.text
        if reason is None:
            max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
            if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            c.finish_reason = reason
            if c.detokenizer is not None and not (c.stop.stop and c.text != c.detokenizer.text):
                c.detokenizer.finish()  # flush a held-back partial character
                c.text = c.detokenizer.text
            if seq.status is SequenceStatus.RUNNING:
                self.scheduler.finish(seq)
            self._by_seq.pop(seq.seq_id, None)

    def _output(self, request: _Request) -> RequestOutput:
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        outputs = []
        for c in sorted(request.completions, key=lambda c: c.index):
            text = c.text
            if c.finish_reason is None and c.stop.stop:
                text = text[:len(text) - c.stop.holdback(text)]  # could be the start of a stop string
            outputs.append(CompletionOutput(c.index, text, list(c.seq.output_token_ids), c.finish_reason,
                                            None if c.logprobs is None else list(c.logprobs)))
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished,
                             request.completions[0].seq.num_cached_prompt_tokens)

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "kv_cache_usage": bm.usage, "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
                "num_kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                "num_kv_blocks": bm.num_blocks, "num_preemptions": self.scheduler.num_preemptions}


def _choose_backend(backends: list, spec: AttentionSpec, platform_name: str):
    reasons = []
    for cls in backends:
        reason = cls.unsupported_reason(spec)
        if reason is None:
            return cls(spec)
        reasons.append(f"{cls.name}: {reason}")
    raise ValueError(f"no attention backend of platform {platform_name!r} supports {spec}: " + "; ".join(reasons))


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _model_name(config: EngineConfig, source) -> str:
    import os
    path = source.path or config.model or "dummy"
    return os.path.basename(os.path.normpath(path))
