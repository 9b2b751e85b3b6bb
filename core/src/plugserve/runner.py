"""Turns one scheduler step into model inputs, runs the model, returns logits of the sampled rows."""
import torch

from plugserve_plugin_api import AttentionBackend, AttentionBatch

from plugserve.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model, backend: AttentionBackend, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device):
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    def build_batch(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, list[int]]:
        """Flatten the step's tokens; call before the scheduler advances num_computed_tokens."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens, tables, sample_rows = [], [], [], []
        for item in scheduled:
            seq = item.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_tokens
            if start >= seq.num_prompt_tokens:
                input_ids.extend(seq.output_token_ids[start - seq.num_prompt_tokens:end - seq.num_prompt_tokens])
            else:
                input_ids.extend(seq.all_token_ids[start:end])
            table = seq.block_table
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(item.num_tokens)
            seq_lens.append(end)
            tables.append(table)
            if item.sampled:
                sample_rows.append(len(input_ids) - 1)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        batch = AttentionBatch(query_start_loc=as_tensor(starts), seq_lens=as_tensor(seq_lens),
                               block_tables=as_tensor(padded), slot_mapping=as_tensor(slots),
                               query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return as_tensor(input_ids), as_tensor(positions), batch, sample_rows

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [num sampled items, vocab] (fp32), in the order of the sampled items."""
        input_ids, positions, batch, sample_rows = self.build_batch(scheduled)
        metadata = self.backend.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(sample_rows, device=hidden.device)])
