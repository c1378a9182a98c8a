"""The engine loop: schedule -> run the model -> sample -> update sequences. Readable in one sitting."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from baton.kernels.linear import select_linear_method

from ..kv.block_manager import BlockManager
from ..kv.connector import HANDOFF, KVConnector
from ..kv.pool import SHM_DIR, KVPool, PoolSpec
from ..loader.quantized import checkpoint_quantization
from ..models.config import ModelConfig
from ..models.decoder import DecoderLM, load_weights
from ..models.lora import LoRAAdapter
from ..runtime import owned_name, remove_leftovers, torch_threads
from ..spec.adaptive import Governor
from ..spec.config import SpeculativeConfig
from ..spec.proposer import Proposer, make_proposer
from ..spec.verifier import verify
from .config import EngineConfig
from .detokenizer import Detokenizer
from .errors import InvalidRequestError
from .model_runner import ModelRunner
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

if TYPE_CHECKING:     # multimodal/ imports engine.errors: imported where used, not at module load
    from ..multimodal.encoder import EmbeddingCache, ImageEncoder
    from ..multimodal.prompt import MultiModalPrompt

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    finished: bool
    text: str = ""            # text delta, for sequences that track text (stream_text or stop strings)
    error: str = ""           # the engine ended this request alone, for this reason (the others go on)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, pool: KVPool | None = None,
                 block_manager: BlockManager | None = None, weights: dict[str, torch.Tensor] | None = None,
                 connector: KVConnector | None = None, proposer: Proposer | None = None,
                 embedding_cache: EmbeddingCache | None = None) -> None:
        """`pool` / `block_manager` let a serving stage run on a node's shared pool (attached by name)
        and its KV manager (over a local channel) instead of private ones; `weights` are the node's
        shared prepared tensors (loader.weight_store) instead of a private load of the checkpoint;
        `connector` brings KV in from, and hands it on to, other engines (kv.connector); `proposer`
        drafts for the configured speculation instead of one built here (decode: the draft stage);
        `embedding_cache`: where a vision model's image embeddings are kept (a node's shared store)."""
        self.engine_config = config
        if not config.model:
            raise InvalidRequestError("model", "no checkpoint directory given")
        self.model_dir = Path(config.model)
        self.config = cfg = ModelConfig.from_dir(config.model)
        self.dtype = resolve_dtype(config.dtype, cfg.torch_dtype)
        self.max_model_len = config.resolved_max_model_len(cfg.max_position_embeddings)
        if self.max_model_len > cfg.max_position_embeddings:
            raise InvalidRequestError("max_model_len", f"{self.max_model_len} exceeds the model's "
                                      f"max_position_embeddings={cfg.max_position_embeddings}")
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        # a pre-quantized checkpoint (GPTQ, AWQ, compressed-tensors), checked against `quantization`
        self.quant = checkpoint_quantization(config.quantization, config.model)
        if weights is None:
            weights = load_weights(cfg, config.model, self.dtype, self.quant)
        if self.device.type != "cpu":     # quantized weights move when their method processes them
            weights = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
        method = select_linear_method(self.dtype, self.device, config.pack_weights, config.quantization, self.quant)
        self.model = DecoderLM(cfg, weights, self.max_model_len, method)
        # adapters multiply in the model's dtype by the float method its unquantized weights would use
        lora_method = select_linear_method(self.dtype, self.device, config.pack_weights, "", None)
        self.loras = {name: LoRAAdapter.load(name, path, cfg, lora_method, self.dtype, str(self.device))
                      for name, path in config.lora_modules.items()}
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.encoder: ImageEncoder | None = None     # the vision tower of a multimodal checkpoint
        if cfg.vision_config is not None and config.vision:
            from ..multimodal.encoder import ImageEncoder, visual_weights

            self.encoder = ImageEncoder.from_dir(config.model, cfg.vision_config, self.dtype, visual_weights(weights),
                                                 embedding_cache)

        if pool is None:
            spec = pool_spec(cfg, self.dtype, config.block_size, config.num_blocks, config.kv_cache_memory_mb << 20,
                             config.kv_cache_dtype)
            remove_leftovers(SHM_DIR)           # pools of engines whose process was killed
            name = owned_name(uuid.uuid4().hex[:8])
            pool = KVPool.create(name, spec) if self.device.type == "cpu" else \
                KVPool.create_on_device(name, spec, str(self.device))
        self.pool = pool
        self.block_manager = block_manager or BlockManager(pool.spec.num_blocks, self.block_size,
                                                           config.enable_prefix_caching)
        budget = config.resolved_token_budget(self.max_model_len)
        if not config.enable_chunked_prefill and budget < self.max_model_len:
            raise InvalidRequestError("max_num_batched_tokens", "must be >= max_model_len without chunked prefill")
        self.connector = connector or KVConnector()
        self.tiers = None
        if config.kv_tiers and block_manager is None:     # the offline engine owns its pool: and its tiers
            from ..kv.tier_connector import TierConnector
            from ..kv.tiers import open_tiers

            self.tiers = open_tiers(config.kv_tiers, config.model, self.pool, self.block_manager)
            self.connector = TierConnector(self.connector, self.tiers, self.tiers.names, self.block_manager)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget, config.enable_chunked_prefill,
                                   self.connector)
        self.runner = ModelRunner(self.model, self.pool, self.loras)
        self.eos_token_ids = set(cfg.eos_token_ids)
        self.sampler = Sampler(config.seed, frozenset(self.eos_token_ids))
        self.spec = SpeculativeConfig.from_table(config.speculative) if config.speculative else None
        self.proposer = proposer or (make_proposer(self.spec, self) if self.spec else None)
        self.governor = Governor(self.spec) if self.spec else None
        # served: whether another stage on this node's cores has work now (stages/cores.py); its
        # drafts would take cores that stage waits for, and a wave of prompts is prefilled later
        self.cores_contended: Callable[[], bool] | None = None
        self._contended = False                                # the running step skipped drafting for it
        k = self.spec.num_speculative_tokens if self.spec else 0
        # acceptance rate = accepted / drafted; per draft position j: accepted_at[j] / drafted_at[j]
        self.spec_stats = {"drafts": 0, "drafted": 0, "accepted": 0, "drafted_at": [0] * k, "accepted_at": [0] * k}
        self.idle_step = False                                 # the last step computed nothing
        self.requests: dict[str, Sequence] = {}

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None,
                    stream_text: bool = False, prefill_only: bool = False,
                    images: list | None = None, mm: MultiModalPrompt | None = None, lora: str = "") -> Sequence:
        """prefill_only: the sequence ends after its first token with finish reason HANDOFF, its K/V
        handed on through the KV connector (the prefill stage). images: one per image placeholder
        in the prompt (encoded bytes, base64, data URLs or PIL images), encoded here; or `mm`, a
        prompt already expanded with its images' embeddings (the prefill stage, from `encode`).
        lora: the name of one of `lora_modules` to run it with ("": the base model)."""
        params = params or SamplingParams()
        self.check_lora(lora)
        ids = self.encode_prompt(prompt)
        if mm is None:
            ids, mm = self.expand_images(ids, images or [])
        seq = Sequence(ids, params, self.block_size, request_id, (cache_salt,) if cache_salt else (), mm, lora)
        seq.prefill_only = prefill_only
        return self.add_sequence(seq, stream_text)

    def add_sequence(self, seq: Sequence, stream_text: bool = False) -> Sequence:
        """Queue a sequence built elsewhere, e.g. decode's from a KVHandle (its prompt was checked
        where it entered)."""
        if seq.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already running")
        params = seq.params
        if (stream_text or params.stop) and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer.json in the model directory")
        if stream_text or params.stop:
            seq.detok = Detokenizer(self.tokenizer, seq.token_ids[: seq.num_prompt_tokens], params.stop)
            if seq.num_output_tokens:          # tokens sampled before it came here (decode: prefill's first)
                seq.detok.add(seq.output_token_ids)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def check_lora(self, lora: str) -> None:
        if lora and lora not in self.loras:
            known = ", ".join(sorted(self.loras)) or "none (lora_modules is empty)"
            raise InvalidRequestError("lora", f"no LoRA adapter named {lora!r}; this server has: {known}")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "model has no tokenizer.json; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt_token_ids", f"id {bad[0]!r} outside the vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        self.check_prompt_length(ids)
        return ids

    def check_prompt_length(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens leave no room to generate within max_model_len={self.max_model_len}")
        if len(ids) // self.block_size + 1 > self.block_manager.num_blocks:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens need more KV blocks than the pool has ({self.block_manager.num_blocks})")

    def expand_images(self, ids: list[int], images: list) -> tuple[list[int], MultiModalPrompt | None]:
        """A prompt with one placeholder per image -> its expanded ids and images (embedded by the
        encoder); (ids, None) for a text-only prompt."""
        cfg = self.config
        if cfg.image_token_id is None or (not images and cfg.image_token_id not in ids):
            if images:
                raise InvalidRequestError("image", f"model {self.model_dir.name!r} does not take images")
            return ids, None
        if self.encoder is None:
            raise InvalidRequestError("image", "this engine runs without its vision tower (vision = false)")
        from ..multimodal.prompt import expand_prompt

        processed = [self.encoder.processor(im, f"image[{i}]") for i, im in enumerate(images)]
        ids, mm = expand_prompt(ids, cfg.image_token_id, processed, self.encoder.tower.cfg.spatial_merge_size)
        self.check_prompt_length(ids)
        mm.embeds = list(self.encoder.encode(processed))
        return ids, mm

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self._forget_ended()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        self.connector.between_steps()
        if self.governor is not None:
            self.governor.tick()
        self._propose()
        scheduled = self.scheduler.schedule()
        self._trim_drafts(scheduled)
        if self.governor is not None:
            self.governor.measured(self._step_kind(scheduled))
        # sequences the scheduler ended because the whole pool could not hold them
        out = [StepOutput(s, [], True) for s in self.scheduler.take_finished()]
        out += self._drop_unencoded(scheduled)
        for o in out:
            self.requests.pop(o.seq.request_id, None)
        if out:
            self._forget_ended()
        self.idle_step = not scheduled           # e.g. every sequence waits for its KV (kv.connector)
        if not scheduled:
            return out
        # where each sequence's rows start, for a proposer that reads the target's features
        starts = {s.seq_id: s.num_computed_tokens for s, _ in scheduled} \
            if self.proposer is not None and self.proposer.needs_features else {}
        seqs, logits = self.runner.run(scheduled)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if not seq.num_draft:                    # drafts: published once verified, below
                self._publish(seq)
        if logits is None:
            self._observe(scheduled, starts)
            return out
        if any(s.num_draft for s in seqs):
            emitted, logprobs = self._verify(logits, seqs)
        else:                                        # no speculation this step: one token each
            tokens, lps = self.sampler(logits, seqs)
            emitted = [[t] for t in tokens]
            logprobs = [[lp] for lp in lps] if lps is not None else None
        for i, (seq, toks) in enumerate(zip(seqs, emitted)):
            speculated = seq.num_draft > 0
            if speculated:                           # drafts leave token_ids; the accepted ones come back below
                seq.drop_tail(seq.num_draft)
                base, seq.num_draft = seq.num_tokens, 0
            reason, text, new = None, "", []
            for j, tok in enumerate(toks):
                seq.append(tok)
                new.append(tok)
                if logprobs is not None and seq.params.logprobs:
                    seq.logprobs.append(logprobs[i][j])
                reason = self._stop_reason(seq, tok)
                if seq.detok is not None:
                    seq.detok.add([tok])
                    if seq.detok.stopped:
                        reason = "stop"
                if reason:
                    break
            if seq.detok is not None:
                text = seq.detok.delta(final=reason is not None)
            if speculated:                           # the accepted drafts' K/V is computed; the last token's is not
                seq.num_computed_tokens = base + min(len(new), len(toks) - 1)
                self._publish(seq)
            if reason:
                self.scheduler.finish(seq, reason)
                self.requests.pop(seq.request_id, None)
            out.append(StepOutput(seq, new, reason is not None, text))
        self._observe(scheduled, starts)
        if any(o.finished for o in out):
            self._forget_ended()
        return out

    def _drop_unencoded(self, scheduled: list[tuple[Sequence, int]]) -> list[StepOutput]:
        """A scheduled prompt chunk whose image embeddings are gone (a decode node recomputing a
        prompt after the node's embedding cache, and the encode server's arena, let them go) ends
        that request alone."""
        out = []
        for s, n in list(scheduled):
            mm, p = s.mm, s.num_computed_tokens
            missing = mm is not None and any(sp.start < p + n and sp.start + sp.length > p and mm.embedding(i) is None
                                             for i, sp in enumerate(mm.spans))
            if missing:
                scheduled.remove((s, n))
                self.scheduler.finish(s, "error")
                out.append(StepOutput(s, [], True, error="its prompt had to be recomputed here (preempted, or its "
                                      "KV could not be read) and its image embeddings were no longer cached; "
                                      "retry the request"))
        return out

    def _publish(self, seq: Sequence) -> None:
        """Only full, computed (and verified) blocks enter the prefix index (and are saved)."""
        full = seq.num_computed_tokens // self.block_size
        if full > seq.num_published_blocks:
            for b in range(seq.num_published_blocks, full):
                self.block_manager.cache_block(seq.block_table[b], seq.block_hashes[b])
            self.connector.save(seq, seq.block_table[seq.num_published_blocks:full])
            seq.num_published_blocks = full

    # ---- speculative decoding (backends/spec) ---------------------------------------------
    def _propose(self) -> None:
        """Append drafts to the running sequences that are decoding: the scheduler then computes each
        draft's K/V with its last token, and the runner returns a row of logits per draft.

        Speculation pays only while the extra rows are cheap and accepted: it is off for the step
        when more than `max_batch` sequences decode or another stage on the cores has work (a wave's
        first sequence out of prefill must not draft while the rest wait for prefill), and off for
        a sequence whose verifying steps emit fewer tokens than the measured break-even
        (spec/adaptive.py). Neither changes a seeded request's tokens: its draws are keyed by
        position (Sampler.noise)."""
        if self.proposer is None:
            return
        sc, sched = self.spec, self.scheduler
        decoding = [s for s in sched.running
                    if not s.loading and not s.prefill_only and s.num_computed_tokens == s.num_tokens - 1]
        self._contended = False
        if len(decoding) > sc.max_batch:
            return
        if self.cores_contended is not None and self.cores_contended():
            self._contended = True
            return
        if not self.governor.step_may_speculate():
            return
        k = sc.num_speculative_tokens
        cands = []
        for s in decoding:
            p = s.params
            if not self.governor.wants(s):
                continue
            room = min(k, p.max_tokens - s.num_output_tokens - 1, self.max_model_len - s.num_tokens - 1)
            if room > 0:
                cands.append((s, room))
        if not cands:
            return
        with torch_threads(sc.proposer_threads):     # spec/config.py: why served proposers take 1
            proposals = self.proposer.propose([s for s, _ in cands], k)
        for (s, room), drafts in zip(cands, proposals):
            for t in drafts[:room]:
                s.append(t)
            s.num_draft = len(drafts[:room])

    def _step_kind(self, scheduled: list[tuple[Sequence, int]]) -> bool | None:
        """For the governor: True when the step verifies drafts, False when it is a plain step of
        at most max_batch decoding sequences (what a speculative step is compared with), else None."""
        if self._contended or not 0 < len(scheduled) <= self.spec.max_batch \
                or any(n != 1 + s.num_draft for s, n in scheduled):
            return None      # a contended step (its time is the other stage's too), a prompt chunk, a big batch
        return any(s.num_draft for s, _ in scheduled)

    def _forget_ended(self) -> None:
        """A proposer's per-sequence state (a draft model's KV) goes when its request ends."""
        if self.proposer is not None:
            self.proposer.forget({s.seq_id for s in self.scheduler.running} | {s.seq_id for s in self.scheduler.waiting})

    def _trim_drafts(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """Drafts the scheduler did not schedule (budget, preemption) leave their sequence."""
        if self.proposer is None:
            return
        n_of = {s.seq_id: n for s, n in scheduled}
        for s in [*self.scheduler.running, *self.scheduler.waiting]:
            if s.num_draft:
                keep = max(0, n_of.get(s.seq_id, 0) - 1) if s.seq_id in n_of else 0
                keep = min(keep, s.num_draft)
                s.drop_tail(s.num_draft - keep)
                s.num_draft = keep

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[list[int]], list[list[float]] | None]:
        want_lp = any(s.params.logprobs for s in seqs)
        raw_lp = torch.log_softmax(logits, -1) if want_lp else None
        emitted, logprobs, r = [], [] if want_lp else None, 0
        st = self.spec_stats
        for s in seqs:
            rows = logits[r:r + 1 + s.num_draft]
            if s.num_draft:
                drafts = s.token_ids[-s.num_draft:]
                rows = self.sampler.adjust_draft_rows(rows, s, s.num_draft)
                base = s.num_tokens - s.num_draft          # position of row 0's token
                toks = verify(rows, drafts, s.params, lambda j, s=s, base=base: self.sampler.noise(s, base + j))
                accepted = len(toks) - 1
                s.spec_drafted += len(drafts)
                s.spec_accepted += accepted
                s.spec_steps += 1
                self.governor.verified(s, len(toks))
                st["drafts"] += 1
                st["drafted"] += len(drafts)
                st["accepted"] += accepted
                for j in range(len(drafts)):
                    st["drafted_at"][j] += 1
                    st["accepted_at"][j] += j < accepted
            else:
                toks = self.sampler(rows, [s])[0]
            emitted.append(toks)
            if logprobs is not None:
                logprobs.append([raw_lp[r + j, t].item() for j, t in enumerate(toks)])
            r += 1 + s.num_draft
        return emitted, logprobs

    def _observe(self, scheduled: list[tuple[Sequence, int]], starts: dict[int, int]) -> None:
        """Hand a feature-reading proposer the target's hidden states of the positions this step
        verified (a speculated sequence's rejected drafts' rows are not)."""
        if self.proposer is None or not self.proposer.needs_features:
            return
        hidden, row_of = self.runner.hidden, self.runner.row_of
        for s, _ in scheduled:
            start = starts[s.seq_id]
            valid = s.num_computed_tokens - start
            if valid > 0 and not s.is_finished:
                r = row_of[s.seq_id]
                self.proposer.observe(s, start, hidden[r:r + valid])

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return HANDOFF if seq.prefill_only else None

    def close(self) -> None:
        if getattr(self, "governor", None) is not None:
            self.governor.close()
        if getattr(self, "proposer", None) is not None:
            self.proposer.close()
            self.proposer = None
        if getattr(self, "tiers", None) is not None:
            self.tiers.close()
            self.tiers = None
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None

    def __del__(self) -> None:
        self.close()


KV_DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}


def pool_spec(cfg: ModelConfig, dtype: torch.dtype, block_size: int, num_blocks: int,
              kv_cache_memory: int, kv_cache_dtype: str = "auto") -> PoolSpec:
    """num_blocks, or (when 0) as many blocks as kv_cache_memory bytes hold; K/V stored in the
    model's dtype, or quantized (kv_cache_dtype int8 / fp8)."""
    kv = KV_DTYPES.get(kv_cache_dtype) or str(dtype).split(".")[-1]
    spec = PoolSpec(0, cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, kv)
    if not num_blocks:
        num_blocks = kv_cache_memory // spec.block_bytes
    if num_blocks < 1:
        raise InvalidRequestError("num_blocks", f"KV pool needs at least one block, got {num_blocks}")
    return replace(spec, num_blocks=num_blocks)


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """'auto' (the checkpoint's), a name like 'bf16', or a torch.dtype."""
    if dtype == "auto":
        return checkpoint_dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidRequestError("dtype", f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(DTYPES)}")
