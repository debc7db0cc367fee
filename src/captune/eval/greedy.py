"""Greedy captioning of whole batches with a static key/value cache; on one GPU, each new token is one CUDA-graph
replay.

Why not `model.generate`: its dynamic cache grows by concatenation (every new token copies the whole cache of the
batch), each step is ~400 small kernel launches from Python, and a left-padded batch takes SDPA's masked path with
a mask rebuilt every step; its own static cache and compilation recompile for every prompt length. Here the prompt
runs once through transformers' forward (its dynamic cache, the unmasked causal kernel when no row is padded), its
keys and values are copied into buffers sized for the whole run, and every further token is the same step at fixed
addresses: the model's forward with an explicit 4-D mask and per-row positions, InternVL's minimum length, the
greedy choice and the stop token. Nothing of transformers' modelling code is replaced: the cache object below is
what its attention layers call `update` on.

The tokens are `generate`'s with the same settings (greedy, min/max new tokens, stop token, pad after it); tested on
the CPU in float32 against `generate` and batch-1 runs with left-padded rows of different tile counts.
"""

from __future__ import annotations

import inspect
import warnings

import torch


class StaticKV:
    """Keys and values of every LLM layer, `[B, kv_heads, L, head_dim]` each, at fixed addresses; `update` writes
    the new token's at `slot` and returns the whole buffer (masked by the caller's 4-D mask)."""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slot = self.slot.to(keys.device)  # a model split over GPUs keeps each layer's cache on its GPU
        keys.index_copy_(2, slot, key_states)
        values.index_copy_(2, slot, value_states)
        return keys, values

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # positions and the mask are always given explicitly; nothing derives them from the cache

    def __len__(self) -> int:
        return len(self.keys)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of transformers' dynamic cache, whichever version's layout."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _drop_layer(cache, i: int) -> None:
    """Free a dynamic-cache layer once copied, so that the two caches never both hold the whole batch."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = cache.layers[i].values = None
    else:
        cache.key_cache[i] = cache.value_cache[i] = None


class GreedyDecoder:
    """Captions batches of up to `batch_size` rows; buffers and the captured step are kept between batches (free
    them with `close`). `graphs`: capture the decode step as a CUDA graph (default: when the whole model is on one
    CUDA device)."""

    def __init__(self, model, stop_token_id: int, pad_token_id: int, max_new_tokens: int, min_new_tokens: int,
                 batch_size: int, graphs: bool | None = None):
        self.model, self.stop, self.pad = model, int(stop_token_id), int(pad_token_id)
        self.max_new, self.min_new, self.rows = max_new_tokens, min_new_tokens, batch_size
        self.device = model.device
        devices = {p.device for p in model.parameters()}
        self.graphs = (self.device.type == "cuda" and len(devices) == 1) if graphs is None else graphs
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes kwargs on
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name is deprecated there)
        self.cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self.length = 0  # cache slots; 0 = nothing allocated yet
        self.graph = None

    # ---------------------------------------------------------------------------------------------- state
    def _allocate(self, rows: int, length: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.close()
        dev = self.device
        self.rows, self.length = rows, length
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # the cache column of the next token
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # how many new tokens each row has
        self.tokens = torch.full((rows,), self.pad, dtype=torch.long, device=dev)  # [B] the last new token
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)  # [B] its position in its row
        self.finished = torch.ones(rows, dtype=torch.bool, device=dev)  # [B]
        self.out = torch.full((rows, self.max_new), self.pad, dtype=torch.long, device=dev)  # [B, max_new]
        self.mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=dev)  # [B, 1, 1, L] keys each row sees
        keys = [torch.zeros(rows, k.shape[1], length, k.shape[3], dtype=k.dtype, device=k.device) for k, _ in like]
        values = [torch.zeros(rows, v.shape[1], length, v.shape[3], dtype=v.dtype, device=v.device) for _, v in like]
        self.kv = StaticKV(keys, values, self.slot)

    def close(self) -> None:
        """Release the cache buffers and the captured graph."""
        self.graph = self.kv = None
        self.length = 0

    # ------------------------------------------------------------------------------------------- the steps
    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [B, V]

    def _choose(self, logits: torch.Tensor, rows: int) -> None:
        """Greedy, as `generate`: the stop token barred below the minimum length, finished rows padded."""
        scores = logits.float()
        scores[:, self.stop] = torch.where(self.step < self.min_new, float("-inf"), scores[:, self.stop])
        new = scores.argmax(-1)  # [rows]
        finished = self.finished[:rows]
        new = torch.where(finished, self.pad, new)
        finished |= new == self.stop
        self.out[:rows].index_copy_(1, self.step, new[:, None])
        self.tokens[:rows] = new
        self.step.add_(1)

    def _decode_step(self) -> None:
        """One new token for every row: the step that is captured as a graph (every input at a fixed address)."""
        self.mask.index_fill_(3, self.slot, True)
        logits = self._forward(input_ids=self.tokens[:, None], attention_mask=self.mask,
                               position_ids=self.pos[:, None], **{self.cache_kw: self.kv})
        self._choose(logits, self.rows)
        self.slot.add_(1)
        self.pos.add_(1)

    def _capture(self) -> None:
        """Capture the step on the freshly allocated buffers (before a batch's prompt is copied into them)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # CUDA graphs want their kernels warmed up outside the capture
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step()
        self.graph = graph

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        """The prompts through the model (vision tower included); returns (first-token logits, dynamic cache)."""
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
        if not bool(attention_mask.all()):  # left-padded rows: their own positions, padding masked
            t = input_ids.shape[1]
            valid = attention_mask.bool()  # [B, T]
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, T]
            mask |= torch.eye(t, dtype=torch.bool, device=input_ids.device)  # a pad sees itself: no empty row (NaN)
            inputs["attention_mask"] = mask
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        return out.logits[:, -1], cache

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` (pad after the stop token) of a left-padded batch on the
        model's device."""
        b, t = input_ids.shape
        logits, cache = self._prefill(input_ids, attention_mask, pixel_values)
        layers = _cache_tensors(cache)
        if b > self.rows or t + self.max_new > self.length:
            # sized for the largest batch seen (eval sends the longest prompts first), rounded to spare reallocations
            self._allocate(max(b, self.rows), -(-(t + self.max_new) // 64) * 64, layers)
            if self.graphs:
                try:
                    self._capture()
                except Exception as e:  # noqa: BLE001 -- e.g. an operation that waits for the host: decode eagerly
                    warnings.warn(f"captune: decoding without CUDA graphs ({type(e).__name__}: {e})", stacklevel=2)
                    self.graphs, self.graph = False, None
        for i, (k, v) in enumerate(layers):
            self.kv.keys[i][:b, :, :t].copy_(k)
            self.kv.values[i][:b, :, :t].copy_(v)
            _drop_layer(cache, i)
        del layers, cache
        self.mask.zero_()
        self.mask[:b, 0, 0, :t] = attention_mask.bool()
        self.mask[b:, 0, 0, 0] = True  # unused rows see one key: no empty softmax
        self.pos.zero_()
        self.pos[:b] = attention_mask.sum(-1)
        self.finished.fill_(True)
        self.finished[:b] = False
        self.out.fill_(self.pad)
        self.step.zero_()
        self._choose(logits, b)
        self.slot.fill_(t)
        done = 1
        while done < self.max_new:
            if done >= self.min_new and bool(self.finished[:b].all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
            done += 1
        return self.out[:b, :done]
