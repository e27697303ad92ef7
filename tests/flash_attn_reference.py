"""Pure-torch stand-ins for the CUDA-only calls of vLLM's FlashAttention backend (vLLM 0.32).

Each follows the documented contract of the call it replaces, and only the part of
it that vLLM's FlashAttention builder and impl use for decoder attention with an
unquantized cache; anything else fails loudly instead of being ignored.

* ``reshape_and_cache_flash`` (``vllm._custom_ops``): writes each token's key and value
  to slot ``slot_mapping[i]`` (block ``slot // block_size``, offset ``slot % block_size``)
  of the token-major ``[num_blocks, block_size, Hkv, D]`` views that
  ``FlashAttentionImpl.do_kv_cache_update`` cuts from the ``[num_blocks, Hkv, block_size, 2D]``
  layer cache. Padding slots (negative) are skipped; ``slot_mapping``'s length is the
  number of tokens (keys may be padded).
* ``flash_attn_varlen_func`` (``vllm.vllm_flash_attn``, paged form): for each row ``b`` of
  ``cu_seqlens_q``, its queries attend to the first ``seqused_k[b]`` keys of the row's
  blocks in ``block_table``; causal masking is bottom-right aligned (query ``i`` of ``n``
  sees keys ``j <= seqused_k - n + i``); query head ``h`` reads KV head
  ``h // (Hq / Hkv)``. Written into ``out``. Keys past ``seqused_k`` are never touched, as the
  kernel predicates its loads on it. The descales apply to fp8 inputs only, which it refuses.
* ``get_scheduler_metadata`` (FA3's ahead-of-time split plan): an opaque tensor that is
  only valid for the batch it was computed for. The stand-in records that batch, and the
  attention stand-in refuses metadata computed for other lengths (on a GPU that mismatch
  would silently compute a wrong split).
"""

from __future__ import annotations

import math

import torch


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    if kv_cache_dtype != "auto":
        raise NotImplementedError(f"the stand-in writes unquantized caches only, not {kv_cache_dtype}")
    num_tokens = slot_mapping.shape[0]
    slots = slot_mapping.long()
    written = slots >= 0
    block_size = key_cache.shape[1]
    blocks, offsets = slots[written] // block_size, slots[written] % block_size
    key_cache[blocks, offsets] = key[:num_tokens][written].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[:num_tokens][written].to(value_cache.dtype)


def get_scheduler_metadata(*, batch_size, max_seqlen_q, max_seqlen_k, cache_seqlens, cu_seqlens_q, page_size, causal, **_):
    return torch.cat(
        [
            torch.tensor([batch_size, max_seqlen_q, max_seqlen_k, page_size, int(causal)], dtype=torch.int32),
            cache_seqlens[:batch_size].to(torch.int32).cpu(),
            cu_seqlens_q[: batch_size + 1].to(torch.int32).cpu(),
        ]
    )


def _check_scheduler_metadata(metadata, batch_size, max_seqlen_q, max_seqlen_k, seqused_k, cu_seqlens_q, page_size, causal):
    expected = get_scheduler_metadata(
        batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, cache_seqlens=seqused_k,
        cu_seqlens_q=cu_seqlens_q, page_size=page_size, causal=causal,
    )  # fmt: skip
    assert torch.equal(metadata, expected), "scheduler_metadata was computed for another batch than the one attended"


def flash_attn_varlen_func(
    q, k, v, *, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal, block_table,
    alibi_slopes=None, window_size=None, softcap=0.0, scheduler_metadata=None, fa_version=None, q_descale=None,
    k_descale=None, v_descale=None, dynamic_causal=None, num_splits=0, s_aux=None, mask_mod=None, aux_tensors=None,
    return_softmax_lse=False, cu_seqlens_k=None,
):  # fmt: skip
    assert fa_version in (2, 3), f"FlashAttention version {fa_version}"
    unsupported = {
        "causal=False": causal is not True, "ALiBi": alibi_slopes is not None, "softcap": bool(softcap),
        "a sliding window": window_size not in (None, [-1, -1]), "sinks": s_aux is not None, "mask_mod": mask_mod is not None,
        "dynamic causal": dynamic_causal is not None, "cu_seqlens_k": cu_seqlens_k is not None, "LSE": return_softmax_lse,
        "fp8": k.dtype not in (torch.float16, torch.bfloat16),
    }  # fmt: skip
    assert not any(unsupported.values()), f"the stand-in does not implement {[n for n, u in unsupported.items() if u]}"
    batch_size = cu_seqlens_q.shape[0] - 1
    _, block_size, num_kv_heads, _ = k.shape
    if scheduler_metadata is not None:
        _check_scheduler_metadata(scheduler_metadata, batch_size, max_seqlen_q, max_seqlen_k, seqused_k, cu_seqlens_q, block_size, causal)
    query_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    key_lens = seqused_k[:batch_size].tolist()
    assert max(query_lens, default=0) <= max_seqlen_q and max(key_lens, default=0) <= max_seqlen_k
    group = q.shape[1] // num_kv_heads
    starts = cu_seqlens_q.tolist()
    for row in range(batch_size):
        num_queries, num_keys = query_lens[row], key_lens[row]
        if num_queries == 0:
            continue
        assert num_queries <= num_keys <= block_table.shape[1] * block_size
        blocks = block_table[row, : math.ceil(num_keys / block_size)].long()
        # [Hq, n, D]: the row's first num_keys slots, each query head beside its KV head
        keys, values = (
            cache.index_select(0, blocks).flatten(0, 1)[:num_keys].float().repeat_interleave(group, dim=1).transpose(0, 1)
            for cache in (k, v)
        )
        queries = q[starts[row] : starts[row] + num_queries].float().transpose(0, 1)
        scores = queries @ keys.transpose(1, 2) * softmax_scale
        visible = torch.arange(num_keys)[None, :] <= (num_keys - num_queries + torch.arange(num_queries))[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[starts[row] : starts[row] + num_queries] = (probs @ values).transpose(0, 1).to(out.dtype)
    return out
