"""How a kept ratio maps onto whole paged-cache blocks.

The scheduler (which frees blocks) and the worker (which compacts and reads
them) never talk to each other about a request: both call ``kept_prompt_blocks``
with the same prompt length and layer settings, so they agree by construction.

A layer's blocks after compaction hold, in order: ``kept`` whole blocks of
selected prompt tokens; a freed gap up to ``prompt_len // block_size``; then the
block holding the prompt's last ``prompt_len % block_size`` tokens (the "tail",
kept in place as a small recent window) followed by the generated tokens.
"""

from __future__ import annotations

import math


def kept_prompt_blocks(prompt_len: int, keep_ratio: float, block_size: int, sink: int, recent: int) -> int:
    """Whole prompt blocks a layer keeps (the rest of ``prompt_len // block_size`` is freed)."""
    full_blocks = prompt_len // block_size
    if keep_ratio >= 1.0 or full_blocks == 0:
        return full_blocks
    tail = prompt_len - full_blocks * block_size
    wanted = round((keep_ratio * prompt_len - tail) / block_size)
    # Protected tokens outside the tail must fit in the kept blocks.
    protected_in_body = min(sink, full_blocks * block_size) + max(0, recent - tail)
    needed = math.ceil(protected_in_body / block_size)
    return min(full_blocks, max(wanted, needed))


def request_keep_ratio(layer_ratio: float, server_budget: float, request_budget: float) -> float:
    """A layer's ratio for a request with its own budget: the layers' mean moves from one budget to the other.

    Below the server's budget every layer shrinks in proportion; above it every layer
    moves the same fraction of the way to 1, so a request budget of 1 keeps every layer
    whole. Either way the per-layer shape of the allocation is kept.
    """
    if request_budget <= server_budget:
        return layer_ratio * request_budget / server_budget
    return layer_ratio + (1.0 - layer_ratio) * (request_budget - server_budget) / (1.0 - server_budget)


def evicted_tokens(prompt_len: int, keep_ratio: float, block_size: int, sink: int, recent: int) -> int:
    """Prompt tokens a layer drops: the freed gap, in tokens."""
    full_blocks = prompt_len // block_size
    return (full_blocks - kept_prompt_blocks(prompt_len, keep_ratio, block_size, sink, recent)) * block_size
