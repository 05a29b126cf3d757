"""Rank 0's scheduler: continuous batching over the tensor-parallel model.

Requests wait in a bounded queue, join the running batch at the next step
(long prompts are fed in chunks so that decoding of others continues), and
leave it when finished or cancelled; their cache slot is freed in the next
step, or kept for a while with its tokens (prefix reuse): a new request whose
prompt starts with the same tokens (a shared system prompt, the earlier turns
of a conversation) takes that slot over, the cache cut to the common prefix,
and only the rest of its prompt is computed. Each step is one STEP message to
every worker and one forward pass on every rank. When a rank is lost, every
in-flight request ends at once with ClusterUnavailable, new requests are
refused, and the scheduler waits for the cluster to re-form, then starts a new
epoch.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpnet import wire
from tpnet.collective import StepAborted
from tpnet.engine.sampling import Sampler, top_alternatives
from tpnet.engine.speculative import (
    DraftLength,
    DraftModel,
    PromptLookup,
    accept_or_replace,
)
from tpnet.engine.step import StepRunner
from tpnet.engine.types import (
    ClusterUnavailable,
    ContextTooLong,
    EngineError,
    GenerationRequest,
    QueueFull,
    TokenOutput,
)
from tpnet.net import Mesh, PeerLost

logger = logging.getLogger("tpnet.engine")


@dataclass(frozen=True)
class EngineLimits:
    # Sequences decoded together in one step: each adds a row to every matmul
    # and a KV cache; 16 keeps a step's latency reasonable on a small machine.
    max_running: int = 16
    # Requests waiting for a place in the batch; beyond it clients get 429.
    max_queued: int = 64
    # Prompt tokens fed per step across all sequences, so a long prompt does
    # not stall the decoding of others for more than one chunk.
    prefill_chunk: int = 256
    # Tokens per sequence (prompt + output), at most the model's context.
    max_context: int = 4096
    # Draft tokens verified per step by speculative decoding at the start;
    # adapts per sequence to its acceptance. 0 turns speculation off.
    speculative_tokens: int = 4
    # Speculate only while at most this many sequences run: drafts buy
    # latency for a few streams, but in a full batch every rejected draft is
    # a row of compute taken from the others.
    speculative_max_batch: int = 4
    # Caches of finished sequences kept for prefix reuse (0 turns it off).
    # Each holds a row of the KV cache on every rank; all are dropped after
    # prefix_idle_s seconds without work, so an idle server gives the memory
    # back.
    prefix_rows: int = 8
    prefix_idle_s: float = 60.0


# A kept cache is reused only for a common prefix at least this long: a
# shorter one saves little and would take a slot that a longer match (a later
# turn of the same conversation) could have used.
MIN_PREFIX_TOKENS = 8


@dataclass
class Sequence:
    request: GenerationRequest
    slot: int
    sampler: Sampler
    tokens: list[int]
    prompt_len: int
    out: asyncio.Queue[TokenOutput | EngineError] = field(default_factory=asyncio.Queue)
    fed: int = 0  # tokens of `tokens` whose cache the ranks hold
    in_cache: int = 0  # positions the ranks hold (fed, plus drafts in a step)
    cached: int = 0  # prompt tokens whose cache came from an earlier sequence
    generated: int = 0
    finished: bool = False
    cancelled: bool = False
    drafts: list[int] = field(default_factory=list)  # being verified this step
    draft_length: DraftLength | None = None

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.fed


class Engine:
    def __init__(
        self,
        runner: StepRunner,
        mesh: Mesh | None,
        limits: EngineLimits,
        metrics: Any = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.runner = runner
        self.mesh = mesh
        self.limits = limits
        self.metrics = metrics
        self.max_context = limits.max_context
        self.vocab_size = runner.model.config.vocab_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # Slot ids: one for every sequence that may run or wait, and one for
        # every kept cache; a heap, so the lowest free id goes out first.
        self._free_slots = list(
            range(limits.max_running + limits.max_queued + limits.prefix_rows)
        )
        self._to_free: list[int] = []
        self._to_trim: list[list[int]] = []
        # slot -> the tokens in its cache, of sequences that have ended, least
        # recently used first
        self.kept: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self.drafter = draft_model
        self.lookup = PromptLookup()
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.epoch = 0
        self.ready = False  # every rank connected and the epoch started
        self.steps = 0
        if mesh is not None:
            mesh.lost_listeners.append(self._on_rank_lost)
            mesh.joined_listeners.append(lambda rank: self._work.set())

    # lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self.mesh is None:
            self.ready = True
        self._task = asyncio.create_task(self._loop(), name="tpnet-scheduler")

    async def close(self, reason: str = "server shutting down") -> None:
        """Fail every queued and running request with a clear error, stop."""
        self._closing = True
        self._fail_all(ClusterUnavailable(reason))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # api-facing ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        missing = self.mesh.missing if self.mesh is not None else []
        return {
            "ok": self.ready and not missing and not self._closing,
            "world_size": self.runner.collective.world_size,
            "missing_ranks": missing,
            "fault_notices": [text for _, text in self.mesh.fault_notices]
            if self.mesh is not None
            else [],
            "running": len(self.running),
            "queued": len(self.waiting),
            "kept_prefixes": len(self.kept),
        }

    def admit(self, prompt_len: int, max_tokens: int | None, count: int = 1) -> None:
        if (
            self._closing
            or not self.ready
            or (self.mesh is not None and self.mesh.missing)
        ):
            missing = self.mesh.missing if self.mesh is not None else []
            raise ClusterUnavailable(
                f"cluster not ready: ranks {missing} missing"
                if missing
                else "cluster not ready"
            )
        if prompt_len + 1 > self.max_context:
            raise ContextTooLong(
                f"prompt has {prompt_len} tokens; the context holds {self.max_context} "
                "including at least one generated token"
            )
        if prompt_len == 0:
            raise ContextTooLong("prompt is empty: at least one token is needed")
        if len(self.waiting) + count > self.limits.max_queued:
            raise QueueFull(
                f"{len(self.waiting)} requests queued, limit {self.limits.max_queued}"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        """Token outputs of one sequence; closing the generator early cancels
        the sequence and frees its cache within one step."""
        self.admit(len(request.prompt_ids), request.max_tokens)
        if not self._free_slots and self.kept:
            self._free_oldest_kept()
        if not self._free_slots:
            raise QueueFull("no free sequence slot")
        seq = Sequence(
            request=request,
            slot=heapq.heappop(self._free_slots),
            sampler=Sampler(request.sampling, request.prompt_ids),
            tokens=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
        )
        if request.speculative and self.limits.speculative_tokens > 0:
            seq.draft_length = DraftLength(self.limits.speculative_tokens)
        self.waiting.append(seq)
        self._work.set()
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True
                self._work.set()

    # scheduling ---------------------------------------------------------------

    def _on_rank_lost(self, rank: int, reason: str) -> None:
        self.ready = False
        self._fail_all(ClusterUnavailable(f"rank {rank} lost: {reason}"))
        self._work.set()

    def _fail_all(self, error: EngineError) -> None:
        for seq in list(self.running) + list(self.waiting):
            if not seq.finished:
                seq.finished = True
                seq.out.put_nowait(error)
            self._release(seq)
        self.running.clear()
        self.waiting.clear()
        self._drop_kept()

    def _release(self, seq: Sequence, keep: bool = False) -> None:
        """Give up the sequence's slot; with `keep`, its cache stays on every
        rank for a later prompt with the same beginning."""
        if seq.slot < 0:
            return
        if self.drafter is not None:
            self.drafter.forget(seq.slot)
        if keep and self.limits.prefix_rows > 0 and seq.fed >= MIN_PREFIX_TOKENS:
            if seq.in_cache > seq.fed:  # drafts that were not accepted
                self._to_trim.append([seq.slot, seq.in_cache - seq.fed])
            self.kept[seq.slot] = seq.tokens[: seq.fed]
            while len(self.kept) > self.limits.prefix_rows:
                self._free_oldest_kept()
        else:
            self._free_slot(seq.slot)
        seq.slot = -1

    def _free_slot(self, slot: int) -> None:
        heapq.heappush(self._free_slots, slot)
        self._to_free.append(slot)

    def _free_oldest_kept(self) -> None:
        self._free_slot(self.kept.popitem(last=False)[0])

    def _drop_kept(self) -> None:
        """Free every kept cache (in the next step)."""
        for slot in self.kept:
            self._free_slot(slot)
        self.kept.clear()

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Let a sequence about to start take over the kept cache that shares
        the longest beginning with its prompt (the last prompt token is always
        computed: its logits give the first output)."""
        prompt = seq.tokens[: seq.prompt_len - 1]
        best, best_len = None, 0
        for slot, tokens in self.kept.items():
            common = _common_prefix(prompt, tokens)
            # >=: of equal matches, the most recently kept
            if common >= MIN_PREFIX_TOKENS and common >= best_len:
                best, best_len = slot, common
        if best is None:
            return
        cut = len(self.kept.pop(best)) - best_len
        if cut:
            self._to_trim.append([best, cut])
        heapq.heappush(self._free_slots, seq.slot)  # never used on the ranks
        seq.slot = best
        seq.fed = seq.in_cache = seq.cached = best_len
        if self.metrics is not None:
            self.metrics.prefix_tokens.inc(best_len)

    async def _loop(self) -> None:
        while not self._closing:
            if self.mesh is not None and (self.mesh.missing or not self.ready):
                await self._reform()
                continue
            self._drop_cancelled()
            self._admit_waiting()
            if not self.running and not await self._idle_until_work():
                continue
            try:
                await self._step()
            except (PeerLost, StepAborted) as exc:
                logger.warning("step %d failed: %s", self.steps, exc)
                self.ready = False
                self._fail_all(ClusterUnavailable(f"cluster step failed: {exc}"))
            except Exception:
                logger.exception("step %d failed; failing its requests", self.steps)
                self._fail_all(EngineError("internal error during the step"))
                self.ready = False
            await asyncio.sleep(0)  # let the HTTP side run between steps

    async def _idle_until_work(self) -> bool:
        """Wait for work. After prefix_idle_s without any, give up the kept
        caches and return True: a step with no sequences then frees them on
        every rank."""
        self._work.clear()
        if not self.kept and not self._to_free:
            await self._work.wait()
            return False
        try:
            await asyncio.wait_for(self._work.wait(), self.limits.prefix_idle_s)
            return False
        except TimeoutError:
            self._drop_kept()
            return True

    async def _reform(self) -> None:
        assert self.mesh is not None
        self.ready = False
        await self.mesh.wait_complete()
        # A fresh random epoch: ranks tell this cluster formation's frames
        # from any earlier one, also after rank 0 itself restarted.
        self.epoch = random.randrange(1, 1 << 23)
        self.runner.begin_epoch(self.epoch)
        self._drop_kept()
        self._to_free.clear()
        self._to_trim.clear()
        self.ready = True
        logger.info(
            "cluster of %d ranks ready (epoch %d)", self.mesh.world_size, self.epoch
        )

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self.running.remove(seq)
            self._release(seq, keep=True)
            logger.info("request %s cancelled", seq.request.request_id)
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._release(seq)

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_running:
            seq = self.waiting.popleft()
            if self.kept:
                self._reuse_prefix(seq)
            self.running.append(seq)

    def _plan(
        self,
    ) -> tuple[dict[str, Any], np.ndarray, list[tuple[Sequence, int, int]]]:
        budget = self.limits.prefill_chunk
        seqs, chunks, members = [], [], []
        for seq in self.running:
            seq.drafts = []
            if seq.pending == 1:
                seq.drafts = self._draft(seq)
                n = 1 + len(seq.drafts)
                seqs.append([seq.slot, n, n])
                chunks.append(seq.tokens[-1:] + seq.drafts)
                members.append((seq, n, n))
                continue
            else:
                n = min(seq.pending, budget)
                if n <= 0:
                    continue
                budget -= n
            rows = 1 if seq.fed + n == len(seq.tokens) else 0
            seqs.append([seq.slot, n, rows])
            chunks.append(seq.tokens[seq.fed : seq.fed + n])
            members.append((seq, n, rows))
        body = {"epoch": self.epoch, "seqs": seqs, "free": self._to_free}
        if self._to_trim:
            body["trim"] = self._to_trim
        self._to_free, self._to_trim = [], []
        tokens = np.array([t for c in chunks for t in c], dtype=np.int32)
        return body, tokens, members

    async def _step(self) -> None:
        body, tokens, members = self._plan()
        if self.mesh is not None:
            frame = wire.encode_json(wire.Kind.STEP, body, payload=tokens)
            for rank in range(1, self.mesh.world_size):
                self.mesh.send(rank, frame)
        logits = await self.runner.run(body, tokens)
        self.steps += 1
        row = 0
        for seq, n, rows in members:
            seq.in_cache += n
            # Of drafts, only those the model agrees with count as fed.
            seq.fed += 1 if seq.drafts else n
            try:
                if seq.drafts:
                    self._verify(seq, logits[row : row + rows])
                elif rows:
                    self._emit(seq, logits[row])
            except Exception:
                # One request's sampling must not take the others down.
                logger.exception("sampling failed for %s", seq.request.request_id)
                self._fail(seq, EngineError("sampling failed for this request"))
            row += rows

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        if not seq.finished:
            seq.finished = True
            seq.out.put_nowait(error)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)

    def _draft(self, seq: Sequence) -> list[int]:
        """Tokens to verify after the sequence's last one (maybe none)."""
        if (
            seq.draft_length is None
            or seq.generated == 0
            or len(self.running) > self.limits.speculative_max_batch
        ):
            return []
        room = self.max_context - len(seq.tokens) - 1
        if seq.request.max_tokens is not None:
            room = min(room, seq.request.max_tokens - seq.generated - 1)
        count = min(seq.draft_length.current, room)
        if count <= 0:
            return []
        if self.drafter is not None:
            drafts = self.drafter.propose(seq.slot, seq.tokens, count)
        else:
            drafts = self.lookup.propose(seq.tokens, count)
        return [t for t in drafts if 0 <= t < self.vocab_size]

    def _verify(self, seq: Sequence, rows: np.ndarray) -> None:
        """Keep the drafts the target model agrees with, then one more token
        of its own: greedily that is exactly what plain decoding emits; when
        sampling, a draft d is kept with probability p(d) (the drafters are
        deterministic) and otherwise replaced by a draw from p without d."""
        drafts = seq.drafts
        accepted = 0
        for i, draft in enumerate(drafts):
            if seq.finished or seq.cancelled:
                break
            params = seq.request.sampling
            if params.temperature == 0:
                token, logprobs = seq.sampler.choose(rows[i])
            else:
                probs = seq.sampler.probabilities(rows[i])
                logprobs = None
                if params.logprobs:
                    logprobs = seq.sampler.log_softmax(seq.sampler.adjust(rows[i]))
                token = accept_or_replace(
                    probs, draft, seq.sampler.uniform(), seq.sampler.draw_from
                )
            if token == draft:
                seq.fed += 1  # the draft's cache entry is this very token
            self._deliver(seq, token, logprobs)
            if token != draft:
                break
            accepted += 1
        else:
            if not (seq.finished or seq.cancelled):
                self._emit(seq, rows[len(drafts)])
        if seq.draft_length is not None:
            seq.draft_length.update(len(drafts), accepted)
        if self.metrics is not None:
            self.metrics.spec_drafted.inc(len(drafts))
            self.metrics.spec_accepted.inc(accepted)
        if seq.in_cache > seq.fed and seq.slot >= 0:
            # The cache holds the rejected drafts: drop them in the next step.
            self._to_trim.append([seq.slot, seq.in_cache - seq.fed])
            seq.in_cache = seq.fed
        seq.drafts = []

    def _emit(self, seq: Sequence, logits: np.ndarray) -> None:
        if seq.finished or seq.cancelled:
            return
        token, logprobs = seq.sampler.choose(logits)
        self._deliver(seq, token, logprobs)

    def _deliver(self, seq: Sequence, token: int, logprobs: np.ndarray | None) -> None:
        params = seq.request.sampling
        seq.sampler.accept(token)
        seq.tokens.append(token)
        seq.generated += 1
        finish = None
        if token in seq.request.stop_token_ids:
            finish = "stop"
        elif (
            seq.request.max_tokens is not None
            and seq.generated >= seq.request.max_tokens
            or len(seq.tokens) >= self.max_context
        ):
            finish = "length"
        output = TokenOutput(
            token_id=token,
            cached_prompt_tokens=seq.cached,
            logprob=float(logprobs[token]) if logprobs is not None else None,
            top_logprobs=top_alternatives(logprobs, params.top_logprobs)
            if logprobs is not None
            else None,
            finish_reason=finish,
        )
        seq.out.put_nowait(output)
        if finish is not None:
            seq.finished = True
            self.running.remove(seq)
            self._release(seq, keep=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
