"""Greedy captioning of whole batches with a static key/value cache; on one GPU, each new token is one CUDA-graph
replay.

Why not `model.generate`: its dynamic cache grows by concatenation (every new token copies the whole cache of the
batch), each step is ~400 small kernel launches from Python, and a left-padded batch takes SDPA's masked path with
a mask rebuilt every step; its own static cache and compilation recompile for every prompt length. Here the prompt
runs once through transformers' forward (the unmasked causal kernel when no row is padded; its repeated blocks
compiled for any batch and prompt length, if asked), its layers writing their keys and values straight
into buffers sized for the whole run, and every further token is the same step at fixed addresses: the model's
forward with an explicit 4-D mask and per-row positions, InternVL's minimum length, the greedy choice and the stop
token. Nothing of transformers' modelling code is replaced: the cache objects below are what its attention layers
call `update` on (`PromptLayer` for the prompt, `StaticKV` after it), and the one-token steps use an attention
function registered with transformers' AttentionInterface (`one_token_attention`).

A batch is `start`ed (everything up to the first new token queued on the GPU) and `finish`ed (the remaining
tokens), so that a caller can decode and write the previous batch's captions while the GPU works.

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
from transformers.cache_utils import Cache, DynamicLayer

from captune.eval.compiled import compiled_regions, replaced

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


class PromptLayer(DynamicLayer):
    """A layer of the prompt's cache: its keys and values go straight into the static buffers (rows and columns from
    0) and nothing is kept (a prompt attends only to itself), so that no second copy of the prompt's cache exists
    (12 GB at batch 64 of the 2B). One of transformers' own cache layers, so that the mask sizes and lengths (0
    before the prompt) are those of the installed version."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.into = (keys, values)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self.into
        b, _, t, _ = key_states.shape  # [B, kv_heads, T, head_dim]
        keys[:b, :, :t].copy_(key_states)
        values[:b, :, :t].copy_(value_states)
        return key_states, value_states


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


def _rope_limit(m) -> int:
    """The longest length for which transformers' rotary update leaves `m`'s frequencies as they are: the trained
    length, or for longrope (Phi-3) the length where it switches from its short to its long factors."""
    config = getattr(m, "config", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    switch = params.get("original_max_position_embeddings") if isinstance(params, dict) else None
    switch = switch or getattr(config, "original_max_position_embeddings", None)
    return min(m.original_max_seq_len, switch or m.original_max_seq_len)


@contextlib.contextmanager
def _fixed_rope(modules: list):
    """Their forward without transformers' `dynamic_rope_update`, which compares a GPU tensor with a number every
    step (a wait for the host: no CUDA graph can be captured) to recompute frequencies past the trained length. Used
    only while every position stays within that length, where the update changes nothing (`_rope_fixed`)."""
    plain = [(m, "forward", types.MethodType(inspect.unwrap(type(m).forward), m)) for m in modules
             if inspect.unwrap(type(m).forward) is not type(m).forward]
    with replaced(plain):  # a forward set on the module itself (accelerate's hooks) is put back after
        yield


class GreedyDecoder:
    """Captions batches; buffers (sized for the largest batch and longest prompt so far) and the captured step are
    kept between batches (free them with `close`). `graphs`: capture the decode step as a CUDA graph (default:
    when the whole model is on one CUDA device). `compile`: the prompt's repeated blocks through torch.compile
    (`compiled_regions`; a model on one device), for any batch size, tile count and prompt length: it fuses the
    norms, rotary embeddings, activations and layer scales around the matmuls (2B on an H200: ~10 s to
    compile, then 1.63 s instead of 1.96 s per batch of 64)."""

    def __init__(self, model, stop_token_id: int, pad_token_id: int, max_new_tokens: int, min_new_tokens: int,
                 graphs: bool | None = None, compile: bool = False):
        self.model, self.stop, self.pad = model, int(stop_token_id), int(pad_token_id)
        self.max_new, self.min_new = max_new_tokens, min_new_tokens
        self.device = model.device
        devices = {p.device for p in model.parameters()}
        one_gpu = self.device.type == "cuda" and len(devices) == 1
        self.graphs = one_gpu if graphs is None else graphs
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes kwargs on
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name is deprecated there)
        self.cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self.text_config = model.config.get_text_config()
        self.layers = list(inner.model.language_model.layers)
        self.dtype = inner.get_input_embeddings().weight.dtype  # the dtype of the hidden states, keys and values
        # not a model split over GPUs (accelerate's hooks move its activations between the layers)
        self.compiled = compiled_regions(inner) if compile and len(devices) == 1 else []
        self.length = 0  # cache slots; 0 = nothing allocated yet
        self.rows = 0
        self.graph = None
        self.replay = None  # the graph that decodes the batch started (None: eagerly)
        self.batch = 0  # rows of the batch started and not yet finished (0: none)
        self.ropes = _rope_modules(model)
        _register_attention()

    # ---------------------------------------------------------------------------------------------- state
    def _allocate(self, rows: int, length: int) -> None:
        """Buffers for `rows` x `length` slots, each layer's on its layer's device."""
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
        c = self.text_config
        kv_heads = c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        places = [next(layer.parameters()).device for layer in self.layers]  # a model split over GPUs: each its own
        keys = [torch.zeros(rows, kv_heads, length, head_dim, dtype=self.dtype, device=d) for d in places]
        values = [torch.zeros(rows, kv_heads, length, head_dim, dtype=self.dtype, device=d) for d in places]
        self.kv = StaticKV(keys, values, self.slot)

    def close(self) -> None:
        """Release the cache buffers and the captured graph."""
        self.graph = self.kv = None
        self.length = self.rows = 0

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
        """Capture the step on the current buffers and rotary frequencies, on the model's GPU whichever is current;
        if it cannot be captured, warn and decode eagerly. The warm-up steps write their keys and values at the last
        slot, which no prompt reaches, and leave the state to `start` to set."""
        current = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.device(self.device), _fixed_rope(self.ropes):
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(current)
                with torch.cuda.stream(stream):  # CUDA graphs want their kernels warmed up outside the capture
                    for _ in range(2):
                        self.step.zero_()
                        self.slot.fill_(self.length - 1)
                        self._decode_step()
                current.wait_stream(stream)
                self.step.zero_()
                self.slot.fill_(self.length - 1)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread (a DataLoader's pin-memory thread) may allocate pinned memory (in the
                # default global mode that invalidates the capture and fails the thread)
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device), capture_error_mode="thread_local"):
                    self._decode_step()
            self.graph, self.rope_freqs = graph, [m.inv_freq for m in self.ropes]
        except Exception as e:  # noqa: BLE001 -- e.g. an operation that waits for the host
            torch.cuda.set_stream(current)  # a failed capture leaves its own stream current
            warnings.warn(f"captune: decoding without CUDA graphs ({type(e).__name__}: {e})", stacklevel=3)
            self.graphs, self.graph = False, None

    def _rope_fixed(self, length: int) -> bool:
        """Whether transformers' rotary update would change nothing for positions up to `length` (`_fixed_rope`)."""
        return all(length <= _rope_limit(m) and m.max_seq_len_cached <= m.original_max_seq_len for m in self.ropes)

    def _frequencies_moved(self) -> bool:
        """Whether a rotary update replaced a frequency tensor that the captured step reads."""
        return any(m.inv_freq is not f for m, f in zip(self.ropes, self.rope_freqs))

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 padded: bool) -> torch.Tensor:
        """The prompts through the model (vision tower included), their keys and values written into the buffers;
        returns the first new token's logits `[B, V]`."""
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values, self.cache_kw: Cache(
            layers=[PromptLayer(k, v) for k, v in zip(self.kv.keys, self.kv.values)])}
        if padded:  # left-padded rows: their own positions, padding masked
            t = input_ids.shape[1]
            valid = attention_mask.bool()  # [B, T]
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, T]
            mask |= torch.eye(t, dtype=torch.bool, device=input_ids.device)  # a pad sees itself: no empty row (NaN)
            inputs["attention_mask"] = mask
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.compiled:
            try:
                with self.compiled_forwards():
                    return self._forward(**inputs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 -- whatever torch.compile cannot handle: eager is the same model
                warnings.warn(f"captune: prompts without torch.compile ({type(e).__name__}: {e})", stacklevel=4)
                self.compiled = []
        return self._forward(**inputs)

    @contextlib.contextmanager
    def compiled_forwards(self):
        """A context in which the compiled blocks (`compile`) run in place of their eager forwards (the rotary
        function swapped in its modelling module for the duration: one decoder's prompt at a time per process).
        Dynamo's recompile limit raises instead of silently running eagerly, so that `_prefill` warns."""
        import torch._dynamo

        loud = "fail_on_recompile_limit_hit"
        with replaced(self.compiled), torch._dynamo.config.patch(
                **({loud: True} if hasattr(torch._dynamo.config, loud) else {})):
            yield

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
              padded: bool | None = None) -> None:
        """Queue a left-padded batch (on the model's device) up to its first new token. `padded`: whether any row
        is left-padded, if the caller knows it without asking the GPU. (transformers' InternVL checks the image
        token count against the vision tower's output, which waits for the vision tower: the host is free again
        once the LLM's part of the prompt is queued.)"""
        b, t = input_ids.shape
        if padded is None:
            padded = not bool(attention_mask.all())
        if b > self.rows or t + self.max_new > self.length:
            # sized for the largest batch and longest prompt seen (eval sends the longest first), rounded up
            self._allocate(max(b, self.rows), max(-(-(t + self.max_new) // 64) * 64, self.length))
        logits = self._prefill(input_ids, attention_mask, pixel_values, padded)
        fixed = self._rope_fixed(t + self.max_new)  # else this batch decodes eagerly, frequencies updated
        if fixed and self.graphs and self.max_new > 1 and (self.graph is None or self._frequencies_moved()):
            # after the prompt: its rotary update may have replaced the frequency tensor the step reads
            self._capture()
        self.replay = self.graph if fixed else None
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
        self.batch = b

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """The new token ids `[B, <= max_new_tokens]` (pad after the stop token) of the batch `start`ed, on the
        model's device (overwritten by the next batch)."""
        b, self.batch = self.batch, 0
        if not b:
            raise RuntimeError("finish() without start()")
        graph = self.replay
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

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 padded: bool | None = None) -> torch.Tensor:
        """`start` then `finish`: the new token ids of one batch."""
        self.start(input_ids, attention_mask, pixel_values, padded)
        return self.finish()
