"""The peers our engine is measured against, behind ``GenerationEngine``'s interface so the
same evaluation suite runs on each (same model, same prompts, same image soft tokens):

* ``HFStaticEngine``: what a user would otherwise write: ``LlamaForCausalLM.generate`` on
  ``batch_size`` left-padded prompts at a time (``inputs_embeds`` carry the image soft
  tokens), every batch running until its last row has stopped;
* ``HFContinuousEngine``: transformers' own continuous batching (``init_continuous_batching``,
  ``max_requests_per_batch = batch_size``, its KV cache sized for the rows; started once per cell). It takes token ids only, so each image soft
  token gets an id of its own past the vocabulary, whose embedding row is that vector (the
  same numbers ``inputs_embeds`` would carry);;
* ``reference_engine``: the reference's algorithm (one row at a time, no cache).

Rows stop at their stop tokens or at their budget; a row's tokens are cut at its first
stop token, as our engine returns them. vLLM is driven from another environment
(``_vllm_peer``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from medcap.generation import GenerationEngine


def _cut(tokens: List[int], stop: set, budget: int) -> List[int]:
    for i, t in enumerate(tokens[:budget]):
        if t in stop:
            return tokens[:i]
    return tokens[:budget]


class _RowBudgets:
    """HF stopping criterion: row ``i`` is done after ``budgets[i]`` new tokens."""

    def __init__(self, budgets: Sequence[int]):
        self.budgets = torch.tensor(list(budgets))

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # with inputs_embeds only, input_ids holds the new tokens alone
        return (input_ids.shape[1] >= self.budgets).to(input_ids.device)


class HFStaticEngine(GenerationEngine):
    """``hf.generate`` over ``batch_size`` rows at a time (static batching), greedy."""

    def __init__(self, model, tokenizer, hf, *, batch_size: int, chunk_size: Optional[int] = None):
        super().__init__(model, tokenizer, batch_size=batch_size, chunk_size=chunk_size)
        self.hf = hf

    @torch.inference_mode()
    def generate_tokens(self, prompts, images, max_new_tokens, keys) -> List[List[int]]:
        from transformers import StoppingCriteriaList

        budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        stop, pad = list(self.tokenizer.stop_tokens), self.tokenizer.pad_id
        out: List[List[int]] = []
        self.last_stats = {"decode_passes": 0, "prefill_passes": 0, "prefill_positions": 0}
        for lo in range(0, len(prompts), self.batch_size):
            rows, b = prompts[lo:lo + self.batch_size], budgets[lo:lo + self.batch_size]
            width = max(len(p) for p in rows)
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)  # [b, L]
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, L]
            for i, p in enumerate(rows):
                tokens[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            imgs = [im for im in images[lo:lo + self.batch_size] if im is not None]
            embeds = self.model.embed(tokens.to(self.device), torch.stack(imgs).to(self.device) if imgs else None)
            gen = self.hf.generate(inputs_embeds=embeds, attention_mask=mask.to(self.device), max_new_tokens=max(b),
                                   do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad,
                                   stopping_criteria=StoppingCriteriaList([_RowBudgets(b)]))  # [b, <= max(b)]
            out += [_cut(g, set(stop), m) for g, m in zip(gen.tolist(), b)]
            self.last_stats["decode_passes"] += gen.shape[1] - 1
            self.last_stats["prefill_passes"] += 1
            self.last_stats["prefill_positions"] += tokens.numel()
        return out


class HFContinuousEngine(GenerationEngine):
    """transformers' continuous batching manager, ``batch_size`` requests per batch, greedy."""

    def __init__(self, model, tokenizer, hf, *, batch_size: int, chunk_size: Optional[int] = None,
                 max_rows: int = 1024):
        super().__init__(model, tokenizer, batch_size=batch_size, chunk_size=chunk_size)
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.hf, self.vocab = hf, model.tok_embeddings.weight.shape[0]
        text = model.tok_embeddings.weight.detach()
        self.slots_per_call = max_rows * model.num_image_tokens  # image rows one call may use
        table = torch.cat([text, text.new_zeros(self.slots_per_call, text.shape[1])])  # [V + n x T, d]
        self.embedding = torch.nn.Embedding.from_pretrained(table, freeze=True)
        hf.model.embed_tokens = self.embedding
        cfg = GenerationConfig(do_sample=False, eos_token_id=list(tokenizer.stop_tokens),
                              pad_token_id=tokenizer.pad_id, max_new_tokens=64)
        # the KV cache sized for this workload (pages of 256 positions, 2 per row at most):
        # left to infer it from free memory, it allocates most of the machine's RAM on a CPU
        # (about 15 s of page faults per start)
        cb = ContinuousBatchingConfig(max_requests_per_batch=batch_size, num_blocks=2 * batch_size + 4,
                                      max_batch_tokens=4096)
        self.manager = hf.init_continuous_batching(generation_config=cfg, continuous_batching_config=cb)
        self.manager.start()  # kept for the cell: a start and stop per call costs ~0.5 s

    def close(self) -> None:
        self.manager.stop(block=True, timeout=60)

    @torch.inference_mode()
    def _ids(self, prompts, images) -> List[List[int]]:
        """Prompts with each image placeholder replaced by an id whose embedding is its vector."""
        out, nxt, image_id = [], self.vocab, self.model.image_token_id
        for p, im in zip(prompts, images):
            if im is None:
                out.append(list(p))
                continue
            vecs = self.model.embed(torch.tensor([list(p)], device=self.device), im[None].to(self.device))[0]  # [s, d]
            ids = list(p)
            for j, t in enumerate(p):
                if t == image_id:
                    self.embedding.weight[nxt] = vecs[j]
                    ids[j] = nxt
                    nxt += 1
            out.append(ids)
        if nxt > self.vocab + self.slots_per_call:
            raise ValueError("more image rows in one call than HFContinuousEngine's max_rows")
        return out

    def generate_tokens(self, prompts, images, max_new_tokens, keys) -> List[List[int]]:
        budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        stop = list(self.tokenizer.stop_tokens)
        ids = self._ids(prompts, images)
        rids = [self.manager.add_request(x, max_new_tokens=m, eos_token_id=stop) for x, m in zip(ids, budgets)]
        done = {}
        while len(done) < len(rids):
            r = self.manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("transformers' continuous batching gave no result in 600 s")
            if r.is_finished():
                if r.error:
                    raise RuntimeError(f"transformers' continuous batching failed: {r.error}")
                done[r.request_id] = r.generated_tokens
        self.last_stats = {}
        return [_cut(list(done[i]), set(stop), m) for i, m in zip(rids, budgets)]


def reference_engine(model, tokenizer) -> GenerationEngine:
    """The reference's algorithm: one row at a time, the whole sequence recomputed per token."""
    return GenerationEngine(model, tokenizer, batch_size=1, use_cache=False)
