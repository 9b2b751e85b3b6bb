"""The offline Python API: ``LLM(model=...).generate(prompts, params)``."""
import itertools
from dataclasses import fields

from plugserve.config import EngineConfig
from plugserve.engine import LLMEngine
from plugserve.outputs import RequestOutput
from plugserve.sampling_params import SamplingParams


class LLM:
    """Runs the engine to completion over a batch of prompts (continuous batching inside)."""

    def __init__(self, model: str | None = None, platform: str | None = None, **engine_args):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_args) - known
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, platform=platform, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, or a list of token-id lists. Outputs come in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p)
            order.append(request_id)
        return self._run(order, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; the model's chat template applies."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(m) for m in conversations]
        return self.generate(prompts, params, use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), disable=not use_tqdm, desc="requests") as bar:
            while len(done) < len(order):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in order]
