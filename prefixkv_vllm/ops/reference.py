"""Pure-torch references for every op in ``torch.ops.prefixkv``.

These define the ops' semantics. They are written for clarity, not speed, and
the kernel tests compare against them. The same contract holds on CPU and CUDA.

Paged cache views
-----------------
Both ops take the key (and value) cache as a view with arbitrary strides, in one
of two forms:

* ``[num_blocks, block_size, num_kv_heads, head_dim]``: vLLM's FlashAttention cache
  directly, and its CPU vec/vec16 caches (keys transposed, a strided head_dim);
* tiled, ``[num_blocks, block_size // slot_tile, slot_tile, num_kv_heads,
  head_dim // dim_tile, dim_tile]``: token slot ``s`` is ``(s // slot_tile, s %
  slot_tile)`` and dim ``d`` is ``(d // dim_tile, d % dim_tile)``. vLLM's CPU AMX
  cache interleaves pairs of dims (keys) or of slots (values) this way (see
  ``backends/cpu_attn``); the first form is the tiled one with one tile each.

Token ``t`` of a sequence lives in block ``block_table[t // block_size]``, slot
``t % block_size``. The CUDA kernels take the first form with ``head_dim``
contiguous. A quantized (fp8) cache holds ``key / k_scale``: ``importance`` reads
the stored values, so its caller folds ``k_scale`` into ``scale``.
"""

from __future__ import annotations

import torch


def tiled(cache: torch.Tensor) -> torch.Tensor:
    """The 6-D tiled form of a paged view (a 4-D view gets one tile each; no copy)."""
    if cache.dim() == 6:
        return cache
    if cache.dim() != 4:
        raise ValueError(f"a paged cache view is 4-D or 6-D, got shape {tuple(cache.shape)}")
    return cache[:, None, :, :, None, :]


def paged_shape(cache: torch.Tensor) -> tuple[int, int, int, int]:
    """``(num_blocks, block_size, num_kv_heads, head_dim)`` of a paged view in either form."""
    num_blocks, slot_tiles, slot_tile, num_kv_heads, dim_tiles, dim_tile = tiled(cache).shape
    return num_blocks, slot_tiles * slot_tile, num_kv_heads, dim_tiles * dim_tile


def _slot_index(cache6: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor):
    """Index of token ``positions`` into a tiled view: ``cache6[index]`` is ``[n, Hkv, dim_tiles, dim_tile]``."""
    slot_tile = cache6.shape[2]
    block_size = cache6.shape[1] * slot_tile
    slots = positions % block_size
    return block_ids.to(torch.long)[positions // block_size], slots // slot_tile, slots % slot_tile


def paged_tokens(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gather the first ``num_tokens`` tokens of one sequence: ``[num_tokens, H, D]``."""
    cache6 = tiled(cache)
    positions = torch.arange(num_tokens, device=cache.device)
    return cache6[_slot_index(cache6, block_ids, positions)].flatten(2)


def attention_lse(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal row log-sum-exp of ``scale * q.k`` for every query: ``[Hq, T]`` float32."""
    num_tokens, num_q_heads, _ = query.shape
    num_kv_heads = paged_shape(key_cache)[2]
    group = num_q_heads // num_kv_heads
    lse = torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=query.device)
    for b in range(seq_lens.numel()):
        q_begin, q_end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        if q_end == q_begin:
            continue
        logits, mask = _causal_logits(query[q_begin:q_end], key_cache, block_table[b], seq_len, group, scale)
        lse[:, q_begin:q_end] = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return lse


def importance(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    min_query_pos: torch.Tensor,
    scale: float,
    scores: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> None:
    """Accumulate, per KV head, the attention each cached key receives.

    Args:
        query: ``[T, Hq, D]`` queries of this prefill chunk, all sequences packed.
        key_cache: paged key view (see module doc), float or fp8; must already hold
            this chunk's keys.
        block_table: ``[B, max_blocks]`` int32.
        query_start_loc: ``[B + 1]`` int32 offsets of each sequence's queries in ``query``.
        seq_lens: ``[B]`` int32 context length including this chunk. Query ``i`` of
            sequence ``b`` sits at absolute position ``seq_lens[b] - q_len[b] + i``
            and sees keys ``0..position`` (causal).
        min_query_pos: ``[B]`` int32. Queries at absolute positions below it add
            nothing: 0 scores every query, ``prompt_len - w`` the last ``w`` (window).
        scale: softmax scale (times ``k_scale`` for an fp8 cache).
        scores: ``[B, Hkv, max_keys]`` float32, updated in place:
            ``scores[b, g, j] += sum_i mean_{h in group g} softmax(scale * q_i.K)[h, j]``.
            Entries at ``j >= seq_lens[b]`` are left untouched.
        lse: optional ``[Hq, T]`` float32 causal row log-sum-exp (as returned by the
            attention kernel). Computed here when absent.

    Never builds an S x S matrix per sequence beyond what a reference may afford;
    the kernels stream over key tiles.
    """
    num_tokens, num_q_heads, _ = query.shape
    num_kv_heads = paged_shape(key_cache)[2]
    group = num_q_heads // num_kv_heads
    if lse is None:
        lse = attention_lse(query, key_cache, block_table, query_start_loc, seq_lens, scale)
    for b in range(seq_lens.numel()):
        q_begin, q_end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        if q_end == q_begin:
            continue
        logits, mask = _causal_logits(query[q_begin:q_end], key_cache, block_table[b], seq_len, group, scale)
        positions = seq_len - (q_end - q_begin) + torch.arange(q_end - q_begin, device=query.device)
        mask &= (positions >= int(min_query_pos[b]))[None, :, None]
        probs = torch.exp(logits - lse[:, q_begin:q_end, None]).masked_fill(~mask, 0.0)
        per_kv_head = probs.sum(dim=1).view(num_kv_heads, group, seq_len).mean(dim=1)
        scores[b, :, :seq_len] += per_kv_head


def compact(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    layers: torch.Tensor,
    block_table: torch.Tensor,
    keep_indices: torch.Tensor,
    num_kept: torch.Tensor,
) -> None:
    """Move each item's kept tokens to the front of its block list, in place.

    One call moves a whole step: every layer, and every request compacting in it.

    Args:
        key_caches, value_caches: ``L`` paged views each (see module doc), written in
            place; layer ``l`` is ``(key_caches[l], value_caches[l])``. All key views share
            one shape, dtype and strides, and so do all value views.
        layers: ``[I]`` int32, the layer of each item (an item is a request in a layer).
        block_table: ``[I, max_blocks]`` int32, the item's block list in its layer.
        keep_indices: ``[I, Hs, K]`` int32 token positions to keep, strictly
            increasing along the last dim for the first ``num_kept[i]`` entries.
            ``Hs == 1`` keeps the same tokens in every KV head; ``Hs == Hkv`` selects
            per KV head (same count in each head).
        num_kept: ``[I]`` int32.

    After the call, token slot ``t < num_kept[i]`` of head ``g`` of item ``i`` holds
    what slot ``keep_indices[i, g or 0, t]`` held before. Other slots are unspecified.
    Items must touch disjoint memory (different blocks, or different layers' caches).
    """
    _, _, num_kv_heads, _ = paged_shape(key_caches[0])
    shared = keep_indices.shape[1] == 1
    for i in range(num_kept.numel()):
        count = int(num_kept[i])
        if count == 0:
            continue
        layer = int(layers[i])
        caches = (tiled(key_caches[layer]), tiled(value_caches[layer]))
        for g in range(num_kv_heads):
            src = keep_indices[i, 0 if shared else g, :count].to(torch.long)
            dst = torch.arange(count, device=src.device)
            for cache in caches:
                gathered = cache[(*_slot_index(cache, block_table[i], src), g)].clone()
                cache[(*_slot_index(cache, block_table[i], dst), g)] = gathered


def _causal_logits(q, key_cache, block_ids, seq_len, group, scale):
    """Logits ``[Hq, q_len, seq_len]`` (float32) and the causal mask for one sequence."""
    q_len = q.shape[0]
    keys = paged_tokens(key_cache, block_ids, seq_len).float()  # [S, Hkv, D]
    keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
    logits = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    positions = seq_len - q_len + torch.arange(q_len, device=q.device)
    mask = (torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None])[None]
    return logits, mask.expand(logits.shape[0], -1, -1).clone()
