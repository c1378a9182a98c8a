"""A small decoder that follows the target's sequences with its own paged KV cache: the draft model,
and the EAGLE head (whose one layer attends over its own past). Each target sequence has a Shadow
(tokens fed, K/V computed, its blocks); a proposal extends the shadows by the tokens the target
verified since, then by the drafts themselves, and the next proposal keeps only the part the target
accepted (`sync`): the draft "catches up after rejections" without recomputing what still holds.
Blocks come from the shadow's own pool (in this process's memory), so they never mix with the
target's prefix index."""

from __future__ import annotations

import uuid

import torch

from ..engine.model_runner import ModelRunner, layout_step
from ..kv.block_manager import BlockManager, OutOfBlocks
from ..kv.pool import KVPool, PoolSpec
from ..models.decoder import DecoderLM
from ..runtime import owned_name


class Shadow:
    """One target sequence as the small decoder sees it (the names layout_step reads)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []    # inputs fed so far (computed or about to be)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.synced = 0                   # leading inputs known to agree with the target's verified tokens


class ShadowDecoder:
    def __init__(self, model: DecoderLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        cfg = model.cfg
        spec = PoolSpec(num_blocks, cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                        str(dtype).split(".")[-1])
        # process memory, not a /dev/shm file: no other process maps it, and a file outlived every
        # decode worker that a node's stop killed (the next start removed it)
        self.pool = KVPool.create_on_device(owned_name("d" + uuid.uuid4().hex[:7]), spec, str(device))
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.pool)
        self.model = model
        self.block_size = block_size
        self.shadows: dict[int, Shadow] = {}

    def shadow(self, seq_id: int) -> Shadow:
        sh = self.shadows.get(seq_id)
        if sh is None:
            sh = self.shadows[seq_id] = Shadow()
        return sh

    def truncate(self, sh: Shadow, n: int) -> None:
        """Keep the first n inputs (their K/V stays valid); the blocks stay with the shadow."""
        del sh.token_ids[n:]
        sh.num_computed_tokens = min(sh.num_computed_tokens, n)
        sh.synced = min(sh.synced, n)

    def forget(self, live: set[int]) -> None:
        """Release the shadows of sequences the engine no longer has."""
        for sid in [s for s in self.shadows if s not in live]:
            self.drop(sid)

    def drop(self, key: int) -> None:
        sh = self.shadows.pop(key, None)
        if sh is not None:
            self.bm.release(sh.block_table)

    def reserve(self, sh: Shadow, n_tokens: int) -> bool:
        """Blocks for n_tokens inputs in all; False when the shadow pool is out of them."""
        need = -(-n_tokens // self.block_size) - len(sh.block_table)
        if need <= 0:
            return True
        try:
            sh.block_table += self.bm.allocate(need)
            return True
        except OutOfBlocks:
            return False

    def extend(self, items: list[tuple[Shadow, list[int]]], embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Feed each shadow its new inputs (blocks reserved) in one forward; returns the hidden state
        of each one's last new input, in the order given. `embeds`: the inputs' embeddings instead of
        the model's own, concatenated in the order of `items`."""
        for sh, new in items:
            sh.token_ids += new
        scheduled = [(sh, len(new)) for sh, new in items]
        if embeds is not None:      # in the order layout_step puts the rows
            at, r = {}, 0
            for sh, n in scheduled:
                at[id(sh)] = (r, n)
                r += n
            order = layout_step(scheduled, self.block_size)[0]
            embeds = torch.cat([embeds[at[id(sh)][0]:at[id(sh)][0] + n] for sh, n in order])
        order, hidden = self.runner.forward(scheduled, embeds)
        last, row = {}, 0
        for sh, n in order:
            row += n
            last[id(sh)] = row - 1
            sh.num_computed_tokens += n
        return hidden.index_select(0, torch.tensor([last[id(sh)] for sh, _ in items], device=hidden.device))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
