"""Structured outputs in the engine: compile off the step loop, mask in the sampler's pass.

`StructuredOutputManager` has two roles, each behind an existing seam:
- a request plug-in (`bind`): checks a new request's constraint, starts compiling it on a
  worker thread (or finds it compiled) and hands the scheduler the future as the request's
  hold, so the request waits in the queue, never the step; a grammar that fails to compile,
  or takes longer than the compile timeout, fails its own request with an InvalidParam;
- a runner-side logits mask (`ModelRunner.masks`): in each step it fills one bitmask for every
  constrained row with one batched call (the sampler's pass applies it, natively, before the
  draw) and advances each sequence's matcher with the token it drew. A grammar allows
  the end-of-sequence token only where it is complete. With speculative decoding it also
  says how much of a draft the grammar allows and fills a row per verified position.

Compiled grammars are cached by the constraint's text (one manager per engine, so per
tokenizer): a second request with the same schema pays nothing. A compile cannot be cancelled:
one past the timeout runs to its end on its thread (at most MAX_COMPILES compile at once; later
ones wait their turn, and a timed-out spec is remembered as failed).
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.core.sequence import Binding
from sarathi.sampling_params import InvalidParam, StructuredOutputsParams
from sarathi.structured_outputs.backend import GrammarBackend, make_backend

logger = logging.getLogger("sarathi")

MAX_COMPILES = 2                       # compiles running at once
COMPILE_NICENESS = 10                  # a compile thread's Linux nice value
CACHE_BYTES = 512 << 20                # compiled grammars kept (LRU) by memory ...
CACHE_ENTRIES = 1024                   # ... and by count
COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StructuredOutputManager:
    """See the module docstring. The backend is made on first use, on a compile thread (it reads
    the whole vocabulary)."""

    def __init__(self, backend: str, tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 compile_timeout: float = 10.0, max_bytes: int = 64 << 10, num_threads: int = 1):
        self.backend_name = "xgrammar" if backend == "auto" else backend
        if importlib.util.find_spec(self.backend_name) is None:
            logger.warning("structured outputs: %s is not installed; constrained requests will fail "
                           "(pip install %s)", self.backend_name, self.backend_name)
        else:
            logger.info("structured outputs: %s backend (reads the vocabulary on first use)", self.backend_name)
        self.compile_timeout = compile_timeout
        self.max_bytes = max_bytes
        self._make_backend = lambda: make_backend(backend, tokenizer, vocab_size, stop_token_ids, num_threads)
        self._backend: Optional[GrammarBackend] = None
        self._backend_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_COMPILES)
        self._cache: "OrderedDict[Tuple, Future]" = OrderedDict()
        self._cache_lock = threading.Lock()
        self._matchers: Dict[int, Any] = {}
        self._bitmask: Optional[torch.Tensor] = None
        # metrics
        self.requests_total = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.compile_failures = 0
        self.compile_seconds: List[float] = []     # the last ones, for the histogram
        self._hist = [0] * (len(COMPILE_BUCKETS) + 1)
        self._compile_sum = 0.0

    # ---- request plug-in --------------------------------------------------------------------
    def bind(self, params, lora_request=None) -> Binding:
        """A constrained request waits for its grammar (its hold); nothing here blocks."""
        spec = params.structured_outputs
        if spec is None:
            return Binding()
        if len(spec.spec.encode("utf-8", "replace")) > self.max_bytes:
            raise InvalidParam(spec.param, f"{spec.param}: the constraint has more than {self.max_bytes} bytes "
                                           f"(--structured-outputs-max-bytes)")
        self.requests_total += 1
        return Binding(holds=(self.compiled(spec),))

    def stats(self, scheduler) -> dict:
        return {"structured_outputs": {
            "backend": self.backend_name, "requests_total": self.requests_total,
            "compile_cache_hits_total": self.cache_hits, "compile_cache_misses_total": self.cache_misses,
            "compile_failures_total": self.compile_failures,
            "compile_seconds_buckets": list(zip(COMPILE_BUCKETS, _cumulative(self._hist))),
            "compile_seconds_count": sum(self._hist), "compile_seconds_sum": self._compile_sum}}

    # ---- compiling --------------------------------------------------------------------------
    @staticmethod
    def key(spec: StructuredOutputsParams) -> Tuple:
        return spec.kind, spec.spec, spec.disable_any_whitespace

    def compiled(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of spec: from the cache, or compiling on a worker thread."""
        key = self.key(spec)
        with self._cache_lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return future
            self.cache_misses += 1
            future = self._cache[key] = Future()
            self._evict()
        threading.Thread(target=self._compile, args=(spec, future), name="grammar-compile", daemon=True).start()
        return future

    def _compile(self, spec: StructuredOutputsParams, future: Future) -> None:
        try:   # the step loop comes first: on a machine of few cores a compile takes what the forward leaves
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
        except (AttributeError, OSError):
            pass
        with self._slots:
            try:
                backend = self.backend()
            except Exception as e:  # noqa: BLE001 - e.g. the library is missing: this request fails
                logger.exception("structured outputs backend failed to load")
                self._fail(future, InvalidParam(spec.param, f"{spec.param}: structured outputs are unavailable: "
                                                            f"{type(e).__name__}: {str(e)[:200]}"))
                return
            start = time.perf_counter()
            timer = threading.Timer(self.compile_timeout, self._fail, (future, InvalidParam(
                spec.param, f"{spec.param}: compiling the constraint took longer than {self.compile_timeout:g}s "
                            f"(--structured-outputs-compile-timeout); simplify the schema or pattern")))
            timer.daemon = True
            timer.start()
            try:
                grammar = backend.compile(spec)
            except InvalidParam as e:
                self._fail(future, e)
                return
            except Exception as e:  # noqa: BLE001 - this request fails, nothing else
                logger.exception("grammar compile failed")
                self._fail(future, InvalidParam(spec.param, f"{spec.param}: the constraint could not be compiled: "
                                                            f"{type(e).__name__}: {str(e)[:300]}"))
                return
            finally:
                timer.cancel()
            elapsed = time.perf_counter() - start
            self._observe(elapsed)
            if future.done():
                logger.warning("a grammar finished compiling %.1fs after its timeout", elapsed - self.compile_timeout)
                return
            future.set_result(grammar)

    def _fail(self, future: Future, error: InvalidParam) -> None:
        with self._cache_lock:   # the timer and the compile thread may both get here
            if future.done():
                return
            self.compile_failures += 1
            future.set_exception(error)

    def _observe(self, seconds: float) -> None:
        self._compile_sum += seconds
        self._hist[next((i for i, b in enumerate(COMPILE_BUCKETS) if seconds <= b), len(COMPILE_BUCKETS))] += 1
        self.compile_seconds = (self.compile_seconds + [seconds])[-100:]

    def _evict(self) -> None:
        """Least recently used compiled grammars beyond the byte and count budgets (caller locks)."""
        backend = self._backend
        if backend is None:
            return
        total = sum(backend.grammar_bytes(f.result()) for f in self._cache.values()
                    if f.done() and f.exception() is None)
        while len(self._cache) > CACHE_ENTRIES or total > CACHE_BYTES:
            key, f = next(iter(self._cache.items()))
            if not f.done():
                break
            del self._cache[key]
            if f.exception() is None:
                total -= backend.grammar_bytes(f.result())

    def backend(self) -> GrammarBackend:
        """The backend, made on first use (it reads the whole vocabulary once)."""
        with self._backend_lock:
            if self._backend is None:
                start = time.perf_counter()
                self._backend = self._make_backend()
                logger.info("structured outputs: %s %s ready over %d tokens in %.2fs", self._backend.name,
                            getattr(self._backend, "version", ""), self._backend.vocab_size,
                            time.perf_counter() - start)
            return self._backend

    # ---- runner side: ModelRunner.masks ------------------------------------------------------
    def claims(self, seq) -> bool:
        return seq.params.structured_outputs is not None

    def bitmask(self, seqs: Sequence[Any], drafts: Optional[Sequence[Sequence[int]]] = None
                ) -> Optional[Tuple[torch.Tensor, List[int]]]:
        """What each constrained row's grammar allows next, in one bitmask: row i is seqs[i]; with
        drafts (speculative decoding), seqs[i] has 1 + len(drafts[i]) rows in turn, row j being
        what it allows after drafts[i][:j]. One batched fill per position: the matchers advance
        through the drafts, then roll back, so they hold what they held before."""
        counts = [1 + len(d) for d in drafts] if drafts is not None else [1] * len(seqs)
        starts = [0, *itertools.accumulate(counts)][:len(seqs)]
        constrained = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not constrained:
            return None
        backend = self.backend()
        matchers = [self._matcher(seqs[i]) for i in constrained]
        total = starts[-1] + counts[-1]
        if self._bitmask is None or self._bitmask.shape[0] < total:
            self._bitmask = backend.allocate_bitmask(max(total, 64))
        advanced = [0] * len(constrained)
        try:
            for j in range(max(counts[i] for i in constrained)):
                live = [n for n, i in enumerate(constrained) if counts[i] > j]
                if j > 0:
                    ok = backend.accept([matchers[n] for n in live], [drafts[constrained[n]][j - 1] for n in live])
                    for n, good in zip(live, ok):
                        advanced[n] += good
                    if not all(ok):   # drafts are checked when proposed (allowed_prefix)
                        raise ValueError("a draft token is not allowed by the grammar")
                backend.fill([matchers[n] for n in live], self._bitmask, [starts[constrained[n]] + j for n in live])
        finally:
            if any(advanced):
                backend.rollback(matchers, advanced)
        return self._bitmask, [starts[i] + j for i in constrained for j in range(counts[i])]

    def allowed_prefix(self, seqs: Sequence[Any], drafts: Sequence[Sequence[int]]) -> List[int]:
        """How many leading tokens of drafts[i] seqs[i]'s grammar allows: the draft stops before
        the first token it refuses or that ends it (a stop token: nothing may be verified after
        it). One batched accept per position, then the matchers roll back."""
        keep = [len(d) for d in drafts]
        constrained = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None and drafts[i]]
        if not constrained:
            return keep
        backend = self.backend()
        matchers = [self._matcher(seqs[i]) for i in constrained]
        advanced = [0] * len(constrained)
        live = list(range(len(constrained)))
        for n in live:
            keep[constrained[n]] = 0
        try:
            for j in range(max(len(drafts[i]) for i in constrained)):
                live = [n for n in live if len(drafts[constrained[n]]) > j]
                if not live:
                    break
                ok = backend.accept([matchers[n] for n in live], [drafts[constrained[n]][j] for n in live])
                ended = backend.terminated([matchers[n] for n in live])
                still = []
                for n, good, end in zip(live, ok, ended):
                    advanced[n] += good
                    if good and not end:
                        keep[constrained[n]] = j + 1
                        still.append(n)
                live = still
        finally:
            if any(advanced):
                backend.rollback(matchers, advanced)
        return keep

    def accept(self, seqs: Sequence[Any], tokens: Sequence[int]) -> Dict[int, str]:
        """Advance the constrained rows' matchers; {seq_id: why} for tokens a grammar refused."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not rows:
            return {}
        ok = self.backend().accept([self._matchers[seqs[i].seq_id] for i in rows], [tokens[i] for i in rows])
        return {seqs[i].seq_id: f"token {tokens[i]} is not allowed by the grammar here"
                for i, good in zip(rows, ok) if not good}

    def drop(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self._matchers.pop(sid, None)

    def _matcher(self, seq) -> Any:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            spec = seq.params.structured_outputs
            with self._cache_lock:
                future = self._cache.get(self.key(spec))
            if future is None:   # evicted while the request waited: compile it again
                future = self.compiled(spec)
            # done (the scheduler held the request until it was) unless it was evicted just now
            matcher = self.backend().matcher(future.result(self.compile_timeout))
            if seq.output_token_ids and not all(self.backend().accept([matcher], [t])[0]
                                                for t in seq.output_token_ids):
                raise ValueError("the tokens generated so far do not match the grammar")
            self._matchers[seq.seq_id] = matcher
        return matcher


def _cumulative(counts: List[int]) -> List[int]:
    out, total = [], 0
    for c in counts[:-1]:
        total += c
        out.append(total)
    return out
