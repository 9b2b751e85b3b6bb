"""Turn a batch of next-token logits into tokens (vLLM / OpenAI semantics).

Pipeline per row, in this order:
  1. repetition penalty (prompt + output), frequency / presence penalties
     (output only), min_tokens suppression of EOS and stop_token_ids;
  2. logprobs are taken HERE: log_softmax of the penalised logits, before
     temperature / top-k / top-p / min-p (OpenAI-like "processed" logprobs;
     vLLM's default "raw" mode would be before penalties);
  3. greedy rows (temperature == 0): argmax, ties -> lowest token id;
  4. other rows: temperature, top-k, top-p, min-p, then sample.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) i.i.d.
selects token i with probability p_i. A seeded row draws its V noise values
from its own generator, so its result depends only on its own logits and
generator state, never on batch size or position. Each non-greedy row
consumes exactly one Exp(1) vector of length V per step; greedy rows consume
nothing.

Everything is batched tensor ops; the host sees one .tolist() per output
field. Rows with no penalties, no logprobs and temperature 0 cost a single
argmax over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from plugserve.sampling_params import SamplingParams


@dataclass
class SamplerRow:
    params: SamplingParams
    generator: torch.Generator | None  # from params.seed; None -> global RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # None unless params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # sorted, most likely first


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int] = ()) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V], got {tuple(logits.shape)}")
        logits = logits.float()
        params = [r.params for r in rows]

        # Fast path: nothing to process, just an argmax for the whole batch.
        if all(p.greedy and p.logprobs is None and not p.has_penalties
               and p.min_tokens == 0 for p in params):
            return [SampledToken(t, None, None) for t in logits.argmax(-1).tolist()]

        logits = self._apply_penalties(logits, rows)
        logits = self._apply_min_tokens(logits, rows)

        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits, -1) if want_lp else None

        token_ids = self._choose(logits, rows)
        ids_list = token_ids.tolist()

        out = [SampledToken(t, None, None) for t in ids_list]
        if want_lp:
            assert logprobs is not None
            idx = torch.tensor(want_lp)
            sub = logprobs[idx]
            chosen = sub.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1).tolist()
            k = max(params[i].logprobs for i in want_lp)
            top_i: list[list[int]] = [[] for _ in want_lp]
            top_v: list[list[float]] = [[] for _ in want_lp]
            if k > 0:
                v, ix = sub.topk(k, dim=-1)
                top_v, top_i = v.tolist(), ix.tolist()
            for j, i in enumerate(want_lp):
                ki = params[i].logprobs
                # topk's order among equal values is unspecified; make it
                # deterministic (most likely first, then lowest id).
                pairs = sorted(zip(top_i[j], top_v[j]), key=lambda t: (-t[1], t[0]))
                out[i].logprob = chosen[j]
                out[i].top_logprobs = pairs[:ki]
        return out

    # -- logit processing ---------------------------------------------------

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        sel = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if not sel:
            return logits
        logits = logits.clone()  # never mutate the model's output buffer
        V = logits.shape[1]
        dev = logits.device
        sub = logits[sel]

        def counts(seqs: list[list[int]]) -> torch.Tensor:
            # Padded scatter-add; the pad id V lands in a dropped extra column.
            width = max((len(s) for s in seqs), default=0)
            c = torch.zeros(len(seqs), V + 1, device=dev)
            if width:
                ids = torch.full((len(seqs), width), V, dtype=torch.long)
                for j, s in enumerate(seqs):
                    if s:
                        ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
                ids = ids.to(dev)
                c.scatter_add_(1, ids, torch.ones_like(ids, dtype=c.dtype))
            return c[:, :V]

        ps = [rows[i].params for i in sel]
        out_counts = counts([rows[i].output_token_ids for i in sel])

        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev).unsqueeze(1)
        if (rep != 1.0).any():
            seen = counts([rows[i].prompt_token_ids for i in sel]) + out_counts > 0
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)

        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev).unsqueeze(1)
        sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)

        logits[sel] = sub
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        V = logits.shape[1]
        masks: list[tuple[int, list[int]]] = []
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids)
                if not p.ignore_eos:
                    banned += self.eos_token_ids
                banned = [t for t in banned if t < V]
                if banned:
                    masks.append((i, banned))
        if not masks:
            return logits
        logits = logits.clone()
        r_idx = [i for i, b in masks for _ in b]
        t_idx = [t for _, b in masks for t in b]
        logits[r_idx, t_idx] = float("-inf")
        return logits

    # -- token choice ---------------------------------------------------------

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        # argmax returns the first maximal index: ties -> lowest token id.
        result = logits.argmax(-1)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not rand:
            return result
        ps = [rows[i].params for i in rand]
        dev = logits.device
        temp = torch.tensor([p.temperature for p in ps], device=dev).unsqueeze(1)
        x = logits[rand] / temp
        V = x.shape[1]
        neg_inf = float("-inf")

        top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in ps], device=dev)
        top_p = torch.tensor([p.top_p for p in ps], device=dev)
        if (top_k < V).any() or (top_p < 1.0).any():
            # One descending sort serves both top-k and top-p.
            sorted_x, order = x.sort(dim=-1, descending=True)
            pos = torch.arange(V, device=dev).unsqueeze(0)
            drop = pos >= top_k.unsqueeze(1)
            sorted_x = sorted_x.masked_fill(drop, neg_inf)
            probs = sorted_x.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p: a token is
            # dropped when the mass strictly before it already reaches top_p.
            mass_before = probs.cumsum(-1) - probs
            drop = drop | (mass_before >= top_p.unsqueeze(1))
            drop[:, 0] = False  # always keep the most likely token
            x = x.scatter(1, order, sorted_x.masked_fill(drop, neg_inf))

        probs = x.softmax(-1)
        min_p = torch.tensor([p.min_p for p in ps], device=dev).unsqueeze(1)
        if (min_p > 0).any():
            thresh = min_p * probs.max(-1, keepdim=True).values
            probs = probs.masked_fill(probs < thresh, 0.0)

        # Exponential race: argmax(p / q), q ~ Exp(1). Unseeded rows share one
        # draw from the global RNG; seeded rows draw from their own generator.
        q = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rand) if rows[i].generator is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), V, device=dev).exponential_()
        for j, i in enumerate(rand):
            g = rows[i].generator
            if g is not None:
                q[j].exponential_(generator=g)
        # Exp(1) can return exactly 0 on some backends; 0/0 would be NaN.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        result[rand] = (probs / q).argmax(-1)
        return result
