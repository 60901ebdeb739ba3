"""The Engine: streamer's Python API and its one run path.

It owns what every run needs, set up once: the split model's files, the compute dtype, the memory plan,
the runner (weight ring and resident blocks) and the memory monitor. Each call makes its own KV cache.
The CLI, the tools and the tests all go through it.

    with Engine("~/llama3-8b-layers", memory_budget="512M") as engine:
        out = engine.generate("the answer to the ultimate question ...", max_new_tokens=8)
        for piece in engine.stream("Who are you?", chat=True, max_new_tokens=64):
            print(piece.text, end="")
        for result in engine.batch([{"id": 1, "prompt": "..."}, {"id": 2, "messages": [...]}]):
            ...
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from . import batch as batching, costs, kernels, speculative
from .budget import KERNELS, Plan, parse_size, plan
from .errors import StreamerError
from .generate import GenStats, SamplingParams, TextOut, check_prompt, generate as decode
from .kvcache import DiskKVCache, KVCache, MemoryKVCache, SplitKVCache
from .layout import ModelFiles
from .memory import MemoryMonitor, MemoryReport
from .runner import Runner
from .tokenizer import STOP_IDS, encode_chat, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MIN_BYTES = 1 << 30  # ~0.02 s saved per GB per token against ~2-20 s of compiling once
COMPILE_MIN_BATCH = 32  # decode attention of 32 sequences: 18-19 ms a layer eager, 6 compiled (8B, 320 positions)
# what compiling takes for a while beside a plan: a first compile of one kernel peaked 340-640 MiB above a run that
# does not compile (522-819 MiB against 167-181, in a memory cgroup), and kept 152 (budget.KERNELS, in the plan).
# A plan that leaves less compiles before loading its resident files: the 8B int4 under memcap 4G had its compiler
# thrashing for minutes when it compiled beside them
COMPILE_MEMORY = 512 << 20


def auto_compile(p: Plan, dtype: torch.dtype, quantized: bool = False) -> bool:
    """compile="auto": the kernels' compile time pays back over many resident bf16 bytes, or many sequences.
    A quantized split's resident bytes do not count: its one-row matmuls take torch's integer kernels, so at
    a few sequences compiling would buy only decode attention, and the first decode step waited for it (the 8B
    int4, all in RAM: 3.37 s against 0.19 for the steps after it)."""
    return (dtype == torch.bfloat16 and kernels.can_compile()
            and ((not quantized and p.resident_bytes >= COMPILE_MIN_BYTES) or p.batch >= COMPILE_MIN_BATCH))


def plan_run(files: ModelFiles, budget: int | None, batch: int, context: int, compile: bool | str,
             dtype: torch.dtype, **kw) -> tuple[Plan, bool]:
    """A run's memory plan (budget.plan; kw: keep_resident, draft, kv_first) and whether it compiles its kernels.
    compile=True plans their memory (KERNELS) where inductor compiles any (kernels.inductor_needed), and a budget
    that cannot hold it is refused, naming them; "auto" compiles where auto_compile says it pays back and the
    budget holds them too, else runs eager."""
    on = compile not in (False, "auto")
    held = KERNELS if kernels.inductor_needed(dtype, files.args.head_dim, files.quantize == "int4") else 0
    p = plan(files, budget, batch, context, **kw, kernels=held if on else 0)
    if compile == "auto" and auto_compile(p, dtype, bool(files.quantize)):
        with contextlib.suppress(StreamerError):
            p, on = plan(files, budget, batch, context, **kw, kernels=held), True
    return p, on


def pick_dtype(name: str | torch.dtype) -> torch.dtype:
    """`auto` is bf16 where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name != "auto":
        if name not in DTYPES:
            raise StreamerError(f"must be auto, float32 or bfloat16, got {name!r}", param="dtype")
        return DTYPES[name]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


@dataclass
class Piece:
    """One generated token, as `Engine.stream` yields it."""
    token: int
    text: str  # what it adds to the text ("" while a stop string may be starting, or without a tokenizer)
    logprob: float  # under the model, before temperature
    top: list[tuple[int, float]] = field(default_factory=list)  # the K best (id, logprob) with logprobs=K
    finish_reason: str | None = None  # "stop" or "length" on the last piece


@dataclass
class Completion:
    """The result of `Engine.generate`."""
    text: str | None  # None without a tokenizer
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    prompt_ids: list[int]
    stats: GenStats

    def as_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "tokens": self.tokens, "text": self.text, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs, "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}


class Engine:
    """A split model ready to run within a memory budget.

    model: a folder written by `streamer split`. memory_budget: bytes or a size such as "512M" (default: the
    memory cgroup's limit, or 85% of the available memory). dtype: "auto", "float32" or "bfloat16".
    max_seq_len: the context (default: the model's). tokenizer: a path or tokenizer object (default: the one in
    the model folder). keep_resident=False streams every block even when the budget could keep some in RAM.
    compile: compile the one-row matmul and the attention of decode (kernels.py): "auto" does where it pays back
    (bf16, a C++ compiler present, and at least COMPILE_MIN_BYTES of unquantized weights kept in RAM or
    COMPILE_MIN_BATCH sequences planned).
    kv_cache: "auto" keeps the KV cache in RAM when the memory plan has room for all of it, else on disk;
    "disk" always on disk (a kv_dir, to resume from, is always on disk).
    runner_options override the planner's runner settings (ring_bytes, resident, max_pass_tokens, readers).
    draft: speculative decoding: "ngram" (prompt lookup), the folder of a smaller split model with
    the same tokenizer, kept in RAM, or any object with propose(tokens, k) -> up to k next ids; up to
    draft_tokens proposals are checked per pass (speculative.py)."""

    def __init__(self, model: str | Path, memory_budget: str | int | None = None, dtype: str | torch.dtype = "auto", *,
                 max_seq_len: int | None = None, tokenizer=None, keep_resident: bool = True,
                 compile: bool | str = "auto", kv_cache: str = "auto", runner_options: dict | None = None,
                 draft: str | Path | None = None, draft_tokens: int | None = None, draft_branches: int = 4):
        self.files = ModelFiles(Path(model).expanduser())
        self.args = self.files.args
        self.dtype = pick_dtype(dtype)
        self.budget = parse_size(memory_budget, "memory_budget") if isinstance(memory_budget, str) else memory_budget
        self.max_seq_len = self.args.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(self.max_seq_len, int) or self.max_seq_len <= 0:
            raise StreamerError(f"must be a positive integer, got {self.max_seq_len!r}", param="max_seq_len")
        if tokenizer is None and self.files.tokenizer_path:
            tokenizer = self.files.tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.stop_ids = self.tokenizer.stop_ids if self.tokenizer else STOP_IDS
        self.keep_resident = keep_resident
        if compile not in (True, False, "auto"):
            raise StreamerError(f"must be True, False or 'auto', got {compile!r}", param="compile")
        self.compile = compile
        if kv_cache not in ("auto", "disk"):
            raise StreamerError(f"must be 'auto' or 'disk', got {kv_cache!r}", param="kv_cache")
        self.kv_placement = kv_cache
        self.runner_options = dict(runner_options or {})
        self.plan: Plan | None = None
        self._runner: Runner | None = None
        self.monitor = MemoryMonitor()
        for name, value in (("draft_tokens", draft_tokens), ("draft_branches", draft_branches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise StreamerError(f"must be a positive integer, got {value!r}", param=name)
        self.draft_tokens, self.draft_branches = draft_tokens, draft_branches
        self.drafter = draft if hasattr(draft, "propose") else speculative.NgramDraft() if draft == "ngram" else None
        self.draft = None if draft is None or self.drafter else Engine(
            draft, dtype=self.dtype, max_seq_len=self.max_seq_len, tokenizer=self.tokenizer, compile=compile)
        if self.draft is not None:
            speculative.check_draft(self, self.draft)

    # --- prompts ------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
                   messages: Sequence[dict] | None = None, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for exactly one of: prompt text (BOS added; chat=True wraps it, with `system`, in the chat
        format), prompt_ids, or chat messages [{"role", "content"}, ...]."""
        given = [n for n, v in (("prompt", prompt), ("prompt_ids", prompt_ids), ("messages", messages)) if v is not None]
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise StreamerError(f"give exactly one of prompt, prompt_ids or messages{got}")
        if prompt_ids is not None:
            if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
                raise StreamerError(f"must be a list of integers, got {type(prompt_ids).__name__}", param="prompt_ids")
            ids = list(prompt_ids)
        else:
            if prompt is not None and not isinstance(prompt, str):
                raise StreamerError(f"must be a string, got {type(prompt).__name__}", param="prompt")
            if prompt == "":
                raise StreamerError("the prompt is empty")
            if self.tokenizer is None:
                raise StreamerError(f"{self.files.folder}: no tokenizer, so text cannot be encoded; give a tokenizer "
                                    "or prompt ids")
            if chat and prompt is not None:
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            if messages is not None:
                if not hasattr(self.tokenizer, "chat"):
                    raise StreamerError(f"{getattr(self.tokenizer, 'path', 'the tokenizer')}: this tokenizer has no chat format")
                if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
                    raise StreamerError("must be a list of {role, content} objects", param="messages")
                ids = encode_chat(self.tokenizer, messages)
            else:
                ids = self.tokenizer.encode(prompt, bos=True)
        check_prompt(ids, self.args.vocab_size)
        return ids

    def sampling(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 logprobs: int = 0, stop: Sequence[str | int] | str | None = None) -> tuple[SamplingParams, list[str]]:
        """Checked sampling parameters, and the stop strings (stop ids join the model's own stop ids)."""
        stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        if not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in stop):
            raise StreamerError("must be a string, a token id, or a list of them", param="stop")
        params = SamplingParams(max_new_tokens, temperature, top_p, seed,
                                self.stop_ids | {s for s in stop if isinstance(s, int)}, logprobs)
        params.check()
        return params, [s for s in stop if isinstance(s, str)]

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt + max_new_tokens - 1 > self.max_seq_len:
            raise StreamerError(f"{self.max_seq_len} is too short for a prompt of {n_prompt} tokens + {max_new_tokens} "
                                "new tokens", param="max_seq_len")

    # --- running ------------------------------------------------------------------------------------------
    def runner(self, batch: int, context: int, kv_first: bool = False) -> Runner:
        """The runner, planned for `batch` sequences of `context` tokens; kept while later calls fit its plan.
        A call that outgrows the plan gets one for at least the old batch and twice the old context (up to
        max_seq_len), since a new plan loads every resident block again: prompts a few tokens longer each
        time (a batch's chunks, a chat) would otherwise reload the model every call."""
        if self._holds(batch, context):
            return self._runner
        if self._runner:
            old = self.plan
            batch = max(batch, old.batch)
            context = max(context, min(self.max_seq_len, 2 * old.context)) if context > old.context else old.context
        self.release()
        self.plan, compile = plan_run(self.files, self.budget, batch, context, self.compile, self.dtype,
                                      keep_resident=self.keep_resident, kv_first=kv_first,
                                      draft=self.draft.files if self.draft else None)
        first = self.plan.kernels > 0 and self.plan.budget - self.plan.predicted_peak < COMPILE_MEMORY
        self._runner = Runner(self.files, self.dtype, self.monitor, compile=compile, compile_first=compile and first,
                              batch=self.plan.batch, **{**self.plan.runner_kwargs(), **self.runner_options})
        return self._runner

    def kv_cache(self, slots: int, kv_dir: str | Path | None = None) -> KVCache:
        """A KV cache for `slots` sequences: in RAM when the plan has room for it all (sized to the plan's context),
        else as many sequences' in RAM as it has room for and the others' on disk, or all on disk, up to max_seq_len tokens each, kept in kv_dir (always on disk, to resume from) or temporary."""
        ram = (self.plan.kv_slots if kv_dir is None and self.kv_placement == "auto" and self.plan is not None
               and slots <= self.plan.batch else 0)
        if ram >= slots:
            return MemoryKVCache(self.args, slots, min(self.plan.context, self.max_seq_len), self.dtype)
        disk = DiskKVCache(self.args, slots - ram, self.max_seq_len, self.dtype, self.files.manifest_sha256,
                           Path(kv_dir).expanduser() if kv_dir is not None else None)
        if ram:  # as many sequences' rows in RAM as the plan has room for, the others' on disk
            return SplitKVCache(MemoryKVCache(self.args, ram, min(self.plan.context, self.max_seq_len), self.dtype), disk)
        return disk

    def stream(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
               messages: Sequence[dict] | None = None, chat: bool = False, system: str | None = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               logprobs: int = 0, stop: Sequence[str | int] | str | None = None, kv_dir: str | Path | None = None,
               stats: GenStats | None = None) -> Iterator[Piece]:
        """Yield generated tokens one by one. kv_dir keeps the KV cache there: a later call whose prompt extends
        this one's (prompt + output) resumes without recomputing it. `stats` (a GenStats) is filled as it goes."""
        params, stop_text = self.sampling(max_new_tokens, temperature, top_p, seed, logprobs, stop)
        ids = self.prompt_ids(prompt, prompt_ids=prompt_ids, messages=messages, chat=chat, system=system)
        self.check_fits(len(ids), max_new_tokens)
        stats = stats if stats is not None else GenStats()
        before = self._runner
        runner = self.runner(1, len(ids) + max_new_tokens)
        io0 = (runner.io.bytes_read, runner.io.passes, runner.io.tokens) if runner is before else (0, 0, 0)
        cache = self.kv_cache(1, kv_dir)
        text = TextOut(self.tokenizer, stop_text) if self.tokenizer else None
        drafter = self._drafter(1)
        steps = decode(runner, cache, ids, params, stats, draft=drafter, k=self.draft_tokens or 0,
                       size=self._pass_size(drafter))
        try:
            for step in steps:
                out, hit = ("", False) if text is None or step.token in params.stop_ids else text.feed(step.token)
                if hit:
                    step.finish_reason = "stop"
                if step.finish_reason and text:
                    out += text.flush()
                yield Piece(step.token, out, step.logprob, step.top, step.finish_reason)
                if step.finish_reason:
                    break
        finally:
            steps.close()
            cache.close()
            if self.draft and drafter:
                drafter.close()  # the model draft's KV cache; a given drafter is the caller's
            io = runner.io
            stats.bytes_read, stats.passes, stats.tokens_run = (io.bytes_read - io0[0], io.passes - io0[1], io.tokens - io0[2])
            stats.resident_bytes = io.resident_bytes
            stats.memory = self.monitor.snapshot().as_dict()

    def generate(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
                 messages: Sequence[dict] | None = None, chat: bool = False, system: str | None = None, **kw) -> Completion:
        """Like `stream`, all at once: text, tokens, logprobs, finish_reason and stats."""
        ids = self.prompt_ids(prompt, prompt_ids=prompt_ids, messages=messages, chat=chat, system=system)
        stats = kw.pop("stats", None) or GenStats()
        pieces = list(self.stream(prompt_ids=ids, stats=stats, **kw))
        return Completion("".join(p.text for p in pieces) if self.tokenizer else None, [p.token for p in pieces],
                          [p.logprob for p in pieces], [p.top for p in pieces] if kw.get("logprobs") else None,
                          pieces[-1].finish_reason, ids, stats)

    def batch(self, requests: Iterable[dict], *, batch_size: int | str = "auto", max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str | int] | None = None,
              totals: dict | None = None) -> Iterator[dict]:
        """Run many requests, all active ones sharing each pass over the weights; yield each result as it
        finishes. A request is {"id", "prompt" | "messages" | "prompt_ids", and optionally max_new_tokens,
        temperature, top_p, seed, stop, logprobs (K: also the K best tokens per step), n (completions: the result
        then holds them as "choices")}; the keyword arguments are the defaults. A request that cannot run
        yields {"id", "error"} (with "param" where a parameter is at fault) and the others go on. batch_size: the
        sequences sharing each pass, or "auto" (costs.choose_batch: the most decode tokens/s the budget allows,
        planned with the batch's KV cache in RAM first). `totals` (a dict) receives prompts, prompt and
        completion tokens, steps (passes over the weights), the batch size, prompt tokens copied from shared
        prefixes rather than recomputed, and with a draft its figures."""
        if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0):
            raise StreamerError(f"must be a positive integer or 'auto', got {batch_size!r}", param="batch_size")
        defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "stop": stop}
        self.sampling(**defaults)  # bad defaults fail the call, not each request
        todo = []
        for k, obj in enumerate(requests):
            rid = obj.get("id", k) if isinstance(obj, dict) else k
            try:
                todo.append(batching.make_request(self, obj, rid, defaults, seed))
            except StreamerError as e:
                yield {"id": rid, "error": str(e), **({"param": e.param} if e.param else {})}
        totals = totals if totals is not None else {}
        totals.update(prompts=0, prompt_tokens=0, completion_tokens=0, steps=0)
        if not todo:
            return
        n_of = {batching.key(r.id): r.n for r in todo if r.n > 1}
        todo = [c for r in todo for c in batching.choices(r)]  # n completions run as n sequences
        context = max(len(r.prompt) + r.params.max_new_tokens for r in todo)
        auto = batch_size == "auto"
        if auto:
            batch_size = self.auto_batch(len(todo), context)
        slots = min(batch_size, len(todo))
        runner = self.runner(slots, context, kv_first=True)  # the batch's KV in RAM before resident blocks
        cache = self.kv_cache(slots)
        drafter = self._drafter(slots)
        target = costs.PassTarget(self.args, self.dtype, runner.max_pass_tokens)
        totals["batch_size"] = slots
        try:
            yield from batching.gather(batching.run_batch(
                runner, cache, todo, self.tokenizer, totals, drafter, self.draft_tokens or 0,
                self._pass_size(drafter), target), n_of, totals)
        finally:
            cache.close()
            if self.draft and drafter:
                drafter.close()

    def auto_batch(self, n: int, context: int) -> int:
        """The batch size with the most decode tokens/s for n sequences of up to `context` tokens under this
        engine's budget (costs.choose_batch); the plan in use already holds any batch up to its own."""
        if self._holds(min(n, costs.AUTO_BATCH_MAX), context):
            return min(n, self.plan.batch)
        size, _ = costs.choose_batch(self.files, self.budget, n, context, self.dtype, self.keep_resident,
                                     draft=self.draft.files if self.draft else None)
        return size

    def _holds(self, batch: int, context: int) -> bool:
        """Whether the runner in use was planned for at least this batch and context."""
        return self._runner is not None and self.plan.batch >= batch and self.plan.context >= context

    def _drafter(self, slots: int):
        """What proposes draft tokens for `slots` sequences: a draft model (kept in RAM, with its KV cache),
        the given object, or None."""
        if self.draft:
            return speculative.ModelDraft(self.draft, self.plan.context, slots, self.draft_branches)
        return self.drafter

    def _pass_size(self, drafter) -> speculative.PassSize | None:
        """With a drafter and no draft_tokens given: what picks the draft tokens per pass from measured costs."""
        return speculative.PassSize(self.args, self.dtype) if drafter and not self.draft_tokens else None

    # --- the rest -----------------------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        """Peak memory so far, per phase."""
        return self.monitor.snapshot()

    def release(self) -> None:
        """Give back the runner's memory (weight ring, resident blocks); the next call plans and loads afresh."""
        if self._runner:
            self._runner.close()
            self._runner = None

    def close(self) -> None:
        self.release()
        self.monitor.stop()
        if self.draft:
            self.draft.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
