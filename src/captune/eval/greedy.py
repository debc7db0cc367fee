"""Greedy captioning of whole batches with a static key/value cache; on one GPU, each new token is one CUDA-graph
replay.

Why not `model.generate`: its dynamic cache grows by concatenation (every new token copies the whole cache of the
batch), each step is ~400 small kernel launches from Python, and a left-padded batch takes SDPA's masked path with
a mask rebuilt every step; its own static cache and compilation recompile for every prompt length. Here the prompt
runs once through transformers' forward (its dynamic cache, the unmasked causal kernel when no row is padded), its
keys and values are copied into buffers sized for the whole run, and every further token is the same step at fixed
addresses: the model's forward with an explicit 4-D mask and per-row positions, InternVL's minimum length, the
greedy choice and the stop token. Nothing of transformers' modelling code is replaced: the cache object below is
what its attention layers call `update` on, and the one-token steps use an attention function registered with
transformers' AttentionInterface (`one_token_attention`).

The tokens are `generate`'s with the same settings (greedy, min/max new tokens, stop token, pad after it); tested on
the CPU in float32 against `generate` and batch-1 runs with left-padded rows of different tile counts, and on a GPU
(graphed step == eager step == `generate` in float32; in bf16 on a trained model, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings

import torch
import torch.nn.functional as F

ONE_TOKEN_ATTENTION = "captune_one_token_sdpa"  # registered with transformers' AttentionInterface below


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


def one_token_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for one new token per row over the whole static cache. Grouped-query attention without copying the
    cache: the query heads that share a key/value head are that head's queries (`[B, kv_heads, group, D]`), which
    is `repeat_kv`'s head order. transformers' SDPA path copies the cache to every query head whenever a mask is
    given (at batch 64 of the 2B, ~1 GB per layer per token: most of a decode step's time)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    if q != 1 or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(b, kv_heads, heads // kv_heads, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)  # [B, kv_heads, group, D]
    return out.reshape(b, 1, heads, d), None  # [B, 1, H, D], as transformers' attention functions return


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ONE_TOKEN_ATTENTION, one_token_attention)


@contextlib.contextmanager
def _attention(config, name: str):
    """The LLM's attention implementation set to `name` for the duration (its layers read it at every call)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _rope_modules(model) -> list:
    """The rotary embeddings whose frequencies transformers may recompute with the length (dynamic NTK, longrope)."""
    return [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "original_max_seq_len")]


@contextlib.contextmanager
def _fixed_rope(modules: list):
    """Their forward without transformers' `dynamic_rope_update`, which compares a GPU tensor with a number every
    step (a wait for the host: no CUDA graph can be captured) to recompute frequencies past the trained length. Used
    only while every position stays within that length, where the update changes nothing (`_rope_unchanged`)."""
    patched = []
    for m in modules:
        plain = inspect.unwrap(type(m).forward)
        if plain is not type(m).forward:
            m.forward = types.MethodType(plain, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class GreedyDecoder:
    """Captions batches; buffers (sized for the largest batch and longest prompt so far) and the captured step are
    kept between batches (free them with `close`). `graphs`: capture the decode step as a CUDA graph (default:
    when the whole model is on one CUDA device)."""

    def __init__(self, model, stop_token_id: int, pad_token_id: int, max_new_tokens: int, min_new_tokens: int,
                 graphs: bool | None = None):
        self.model, self.stop, self.pad = model, int(stop_token_id), int(pad_token_id)
        self.max_new, self.min_new = max_new_tokens, min_new_tokens
        self.device = model.device
        devices = {p.device for p in model.parameters()}
        self.graphs = (self.device.type == "cuda" and len(devices) == 1) if graphs is None else graphs
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes kwargs on
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name is deprecated there)
        self.cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self.length = 0  # cache slots; 0 = nothing allocated yet
        self.rows = 0
        self.graph = None
        self.ropes = _rope_modules(model)
        self.text_config = model.config.get_text_config()
        _register_attention()

    # ---------------------------------------------------------------------------------------------- state
    def _allocate(self, rows: int, length: int, like: list) -> None:
        """Buffers for `rows` x `length` slots, each layer's shaped, typed and placed as `like`'s (dynamic-cache
        layers) keys and values."""
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
        keys = [torch.zeros(rows, k.shape[1], length, k.shape[3], dtype=k.dtype, device=k.device)
                for k in (layer.keys for layer in like)]
        values = [torch.zeros(rows, v.shape[1], length, v.shape[3], dtype=v.dtype, device=v.device)
                  for v in (layer.values for layer in like)]
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
        with _attention(self.text_config, ONE_TOKEN_ATTENTION):
            logits = self._forward(input_ids=self.tokens[:, None], attention_mask=self.mask,
                                   position_ids=self.pos[:, None], **{self.cache_kw: self.kv})
        self._choose(logits, self.rows)
        self.slot.add_(1)
        self.pos.add_(1)

    def _capture(self) -> None:
        """Capture the step on the freshly allocated buffers (before a batch's prompt is copied into them), on the
        model's GPU whichever is current; if it cannot be captured, warn and decode eagerly."""
        current = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.device(self.device), _fixed_rope(self.ropes):
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(current)
                with torch.cuda.stream(stream):  # CUDA graphs want their kernels warmed up outside the capture
                    for _ in range(2):
                        self.step.zero_()
                        self._decode_step()
                current.wait_stream(stream)
                self.step.zero_()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile (in the
                # default global mode that invalidates the capture and fails the thread)
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device), capture_error_mode="thread_local"):
                    self._decode_step()
            self.graph, self.rope_freqs = graph, [m.inv_freq for m in self.ropes]
        except Exception as e:  # noqa: BLE001 -- e.g. an operation that waits for the host
            torch.cuda.set_stream(current)  # a failed capture leaves its own stream current
            warnings.warn(f"captune: decoding without CUDA graphs ({type(e).__name__}: {e})", stacklevel=3)
            self.graphs, self.graph = False, None

    def _rope_unchanged(self, length: int) -> bool:
        """Whether the captured step's rotary frequencies hold for positions up to `length` (`_fixed_rope`)."""
        return all(length <= m.original_max_seq_len and m.max_seq_len_cached <= m.original_max_seq_len
                   and m.inv_freq is f for m, f in zip(self.ropes, self.rope_freqs))

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
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # transformers >= 5.2x: cache
        return out.logits[:, -1], cache

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` (pad after the stop token) of a left-padded batch on the
        model's device."""
        b, t = input_ids.shape
        logits, cache = self._prefill(input_ids, attention_mask, pixel_values)
        if b > self.rows or t + self.max_new > self.length:
            # sized for the largest batch seen (eval sends the longest prompts first), rounded to spare reallocations
            self._allocate(max(b, self.rows), -(-(t + self.max_new) // 64) * 64, cache.layers)
            if self.graphs and self.max_new > 1:
                self._capture()
        for i, layer in enumerate(cache.layers):  # transformers' dynamic cache
            self.kv.keys[i][:b, :, :t].copy_(layer.keys)
            self.kv.values[i][:b, :, :t].copy_(layer.values)
            layer.keys = layer.values = None  # each layer freed once copied
        del cache
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
        graph = self.graph if self.graph is not None and self._rope_unchanged(t + self.max_new) else None
        done = 1
        while done < self.max_new:
            if done >= self.min_new and bool(self.finished[:b].all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._decode_step()
            done += 1
        return self.out[:b, :done]
