"""What `--num-draft auto` knows before it decodes: each step's cost, measured once per setting, and each pair's
acceptance from earlier runs, both kept in a user cache directory.

Step costs: the first time a combination of main model, draft (model or lookup), dtype, kernels, thread count, batch
size and project and MLX versions is used, the decoding loop itself is timed for a second or two: steps of k drafts for
k = 0..max (where a round of them all would outlast BUDGET, a large model: k = 0 and seven lengths up to max,
measured_lengths), a few steps of each k in a row (a block, each decoded from the prompt afresh), every k in turn, a
few rounds (one where a round takes seconds), each step's time from one host synchronisation to the next (plain steps
of one sequence: a run of up to PLAIN_RUN of them, from one token to the next). A first round warms up untimed (first
runs of each shape are slow), plain steps and the longest drafts first, which tell how long a round takes; each block's
mean step time counts once (plain steps in a row alternate long and short, as each is built while the one before
computes), and the median of the blocks per k, smoothed along k (the lengths between those measured read off the same
curve), is kept, keyed by all of the above; a change of any of them measures again. Beside the table, what a draft
model's step costs beyond it, per token (setup_costs): encoding the prompt at its first draft, and catching up on
tokens after plain steps.
Acceptance: the per-position estimates a pair and drafter ended a run with start the next run.

The cache directory is $T5_SPECULATIVE_CACHE, else $XDG_CACHE_HOME/t5-speculative, else ~/.cache/t5-speculative;
never the model's directory. A file that cannot be read is measured again and replaced, after one warning.
"""

import blas

import atexit
import hashlib
import json
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import kernels
from drafters import Draft, ModelDrafter, no_draft
from generation import Stats

ENV_VAR = "T5_SPECULATIVE_CACHE"
ROOT = Path(__file__).resolve().parent
# The code that decodes, and this module, which measures it: a change to any of it may change the costs.
SOURCES = (
    "model.py",
    "cache.py",
    "decoder.py",
    "batch_decoder.py",
    "batch_rows.py",
    "drafters.py",
    "sampling.py",
    "step_costs.py",
)
# Digits, so that any tokenizer the decoder is given encodes them (a test's counting tokenizer included).
PROMPT = "31415926535897932384626433832795028841971693993751"
BLOCK = 5  # steps of one length in a row; the first is dropped (it follows a step of another length)
# Plain steps are timed in runs of up to PLAIN_RUN (auto's runs are 4-64 steps), as many as take PLAIN_RUN_SECONDS
# at the warm-up's pace, BLOCK + 1 at least: the first few of a run after drafting steps cost more (on a 2-core
# virtual machine the demo pair's first four took 0.4-1.1 ms against 0.25-0.33 later), and a run of BLOCK + 1 made
# plain steps look twice as dear as auto's runs of them, and drafting worth it where it was not.
PLAIN_RUN = 16
PLAIN_RUN_SECONDS = 0.05
MIN_ROUNDS, MAX_ROUNDS = 3, 8  # timed rounds, after one untimed warm-up round
BUDGET = 1.5  # seconds of measuring after which no further round starts (beyond MIN_ROUNDS)
# Seconds of measuring after which no further round starts at all (one timed round is always taken): a t5-base step of
# 15 drafts takes a tenth of a second, and three rounds of every length once took 26 s before its first token.
MAX_BUDGET = 4.0
MEASURED_LENGTHS = 8  # the most draft lengths from 1 up that are timed; the others come from the curve through them
SETUP_REPEATS = 7  # timed repeats of each case of setup_costs, after one untimed
CATCH_UP = 32  # tokens a draft model catches up on in setup_costs
SETUP = ("encode", "catch_up")
warned = set()  # paths already warned about, so that each is reported once
# A file written again within this many seconds of its last write waits: the latest record is written by the next
# write after that, or when the process exits (a loop of short generations would otherwise write after each one).
WRITE_INTERVAL = 2.0
pending: Dict[Path, dict] = {}  # records not yet written, by path
last_written: Dict[Path, float] = {}


def cache_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t5-speculative"


def warn(path: Path, message: str):
    if path not in warned:
        warned.add(path)
        print(f"warning: {message}", file=sys.stderr)


def read(path: Path) -> Optional[dict]:
    """The JSON object in `path` (or the record waiting to be written there); None when there is none or it is
    unreadable (after a warning)."""
    if path in pending:
        return json.loads(json.dumps(pending[path]))
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as e:
        warn(path, f"ignoring the unreadable cache file {path} ({e}); it will be measured again and replaced")
        return None


def write_soon(path: Path, record: dict):
    """Write `record` to `path` now, or where the file was written less than WRITE_INTERVAL seconds ago, when the next
    write comes after that, or at exit."""
    now = time.monotonic()
    if now - last_written.get(path, float("-inf")) < WRITE_INTERVAL:
        if not pending:
            atexit.register(flush)
        pending[path] = record
        return
    pending.pop(path, None)
    last_written[path] = now
    write(path, record)


def flush():
    """Write every record still waiting."""
    while pending:
        path, record = pending.popitem()
        write(path, record)
    atexit.unregister(flush)


def write(path: Path, record: dict):
    """Write `record` to `path` whole or not at all; a cache that cannot be written is only a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, path)
    except OSError as e:
        warn(path, f"cannot write the cache file {path} ({e}); set {ENV_VAR} to a writable directory")


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shape_of(model) -> dict:
    """What a model's step costs depend on: its configuration and every weight's shape and dtype."""
    return dict(
        args=vars(model.args),
        weights=[(name, w.shape, str(w.dtype)) for name, w in tree_flatten(model.parameters())],
    )


def identity_of(model) -> str:
    """What a model's acceptance depends on: its shape and its weights (a few values of each tensor)."""
    weights = [w.reshape(-1)[:16].astype(mx.float32) for _, w in tree_flatten(model.parameters())]
    values = np.array(mx.concatenate(weights)) if weights else np.zeros(0)
    return digest([shape_of(model), hashlib.sha256(values.tobytes()).hexdigest()])


def project_version() -> str:
    """The decoding code's and the native kernels' build's identity (a rebuilt library may be faster or slower)."""
    sources = [(ROOT / name).read_bytes().hex() if (ROOT / name).exists() else None for name in SOURCES]
    build = None
    if kernels.native is not None:
        stat = Path(kernels.native.__file__).stat()
        build = [stat.st_size, stat.st_mtime_ns]
    return digest([sources, build])


def cost_key(decoder, sources: List[str], batch_size: int) -> dict:
    return dict(
        main=shape_of(decoder.model),
        draft=shape_of(decoder.draft_model) if "model" in sources else None,
        sources=sorted(sources),
        max_num_draft=decoder.max_num_draft,
        greedy=decoder.sampler.greedy,
        batch_size=batch_size,
        device=str(mx.default_device()),
        kernels=kernels.active,
        blas=blas.active,
        threads=[os.cpu_count()]
        + [os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "T5_KERNEL_THREADS")],
        ranks=decoder.model.group.size() if decoder.model.group is not None else 1,
        mlx=mx.__version__,
        project=project_version(),
    )


def acceptance_path(decoder) -> Path:
    """Where a pair's acceptance is remembered: per main model, draft, drafter and sampling settings."""
    sampler = decoder.sampler
    key = [
        identity_of(decoder.model),
        identity_of(decoder.draft_model) if decoder.draft_model is not None and decoder.drafter != "lookup" else None,
        decoder.drafter,
        decoder.max_ngram,
        [sampler.temperature, sampler.top_k, sampler.top_p, decoder.delta],
    ]
    return cache_dir() / "acceptance" / f"{digest(key)}.json"


class Done(Exception):
    """The measuring schedule is through."""


class Schedule:
    """A draft-length policy that measures: a block of BLOCK steps of one k at a time, each block a decoding of its own
    from the prompt, so that every k is timed at the short contexts of real outputs (one decoding through every k
    would time the longest drafts at the longest contexts, whose attention costs more). A block's first step is
    dropped (it follows the prompt's setup, and builds the draft's cross-attention keys); the mean of the others is
    kept by k, unless the round is a warm-up. One step more than the block is taken and not kept: a plain step chooses
    the next step's length before its own time is known.

    Plain steps are timed as auto takes them, a run at a time (plain_run), one row or a batch: a run has no choice or
    timing between its steps, and costs less a step than plain steps taken one by one, for which the table would
    otherwise make drafting look cheap beside them. The run is timed as the decoding loop times it for auto
    (record_run: from its second step to its last, the first waiting for its step alone); its mean counts as a block's.
    The warm-up's run is BLOCK + 1 steps, the timed ones as long as PLAIN_RUN and PLAIN_RUN_SECONDS allow."""

    def __init__(self, max_num_draft: int):
        self.max_num_draft = max_num_draft
        self.lengths = measured_lengths(max_num_draft)
        self.seconds: Dict[int, List[float]] = {k: [] for k in self.lengths}
        self.run_steps = BLOCK + 1  # of a run of plain steps

    def round(self, warm_up: bool = False):
        self.warm_up = warm_up

    def time_every_length(self):
        """Time every length from 0 to the longest, not only measured_lengths'."""
        self.lengths = list(range(self.max_num_draft + 1))
        self.seconds = {k: self.seconds.get(k, []) for k in self.lengths}

    def block(self, k: int):
        """Start the block of k drafts a step."""
        self.k = k
        self.chosen = deque()  # indices in the block of the steps chosen and not yet timed
        self.count = 0
        self.times: List[float] = []
        self.in_run = False

    def choose(self, source, limit, unready=None):
        if self.count > BLOCK or self.in_run:
            raise Done
        self.chosen.append(self.count)
        self.count += 1
        return self.k

    choose_batch = choose

    def plain_run(self, limit, watched=False):
        self.in_run = True
        return min(self.run_steps, limit)

    def choose_in_run(self, source, limit, unready=None):
        return 0  # the run's length ends it

    def record_time(self, source, drafted, seconds, own=True):  # (a block's first step is dropped whatever `own`)
        if 0 < self.chosen.popleft() < BLOCK:
            self.times.append(seconds)

    def record_run(self, steps, seconds):
        if seconds is not None:
            self.times = [seconds] * (BLOCK - 1)  # (its mean, counted as a block of BLOCK steps is)
            if self.warm_up:
                self.run_steps = max(BLOCK + 1, min(PLAIN_RUN, int(PLAIN_RUN_SECONDS / max(seconds, 1e-9))))

    def record_acceptance(self, source, drafted, accepted):
        pass

    def end_block(self):
        if not self.warm_up and len(self.times) == BLOCK - 1:
            self.seconds[self.k].append(statistics.fmean(self.times))

    def table(self) -> List[float]:
        return smoothed([statistics.median(self.seconds[k]) for k in self.lengths], self.lengths)


def measured_lengths(max_num_draft: int) -> List[int]:
    """The draft lengths whose steps are timed: 0, and every one up to MEASURED_LENGTHS drafts; beyond, 1, 2 and 3 and
    the rest spread evenly up to the longest (for 15: 1, 2, 3, 6, 9, 12 and 15)."""
    if max_num_draft <= MEASURED_LENGTHS:
        return list(range(max_num_draft + 1))
    spread = MEASURED_LENGTHS - 3
    return [0, 1, 2, 3] + sorted({round(3 + (max_num_draft - 3) * i / (spread - 1)) for i in range(1, spread)})


def smoothed(table: List[float], lengths: Optional[List[int]] = None) -> List[float]:
    """Measured step times of `lengths` drafts (by default k = 0..len(table) - 1; 0 among them) as the table for k =
    0..max, their noise evened out. From one draft on, a step's cost grows smoothly with its drafts (the draft's steps
    one by one, the verification's rows together), so those are a least-squares quadratic in k through the
    measurements, kept non-decreasing, and read at every k; plain steps (k = 0, which overlap each other) stay as
    measured. Single blocks of a busy machine would otherwise make one length look cheaper than its neighbours and be
    chosen for it."""
    lengths = list(range(len(table))) if lengths is None else lengths
    measured = dict(zip(lengths, table))
    top = max(lengths)
    if len(table) < 5:
        return [measured[k] for k in range(top + 1)]  # (every length is measured up to MEASURED_LENGTHS)
    ks = np.array([k for k in lengths if k])
    times = np.array([measured[k] for k in ks])
    fitted = np.polyval(np.polyfit(ks, times, 2), np.arange(1, top + 1))
    fitted = np.maximum.accumulate(np.maximum(fitted, times.min()))
    return [measured[0]] + [float(t) for t in fitted]


class RepeatDrafter:
    """Drafts as a lookup does (no model, deterministic, chosen per sequence), always as many tokens as asked."""

    reads_tokens = True

    def prepare(self, prompt_ids, encoder_output=None):
        pass

    def source(self, sequence):
        return "lookup"

    def unready(self, sequence):
        return 0, 0

    def propose(self, sequence, k, key=None) -> Draft:
        return Draft(mx.array(sequence[-1:] * k, dtype=mx.int32), None, "lookup") if k else no_draft()

    def rewind(self, length):
        pass


def measure(decoder, source: str, batch_size: int) -> List[float]:
    """Seconds of a decoding step with k = 0..max drafts from `source`, `batch_size` rows at a time."""
    import batch_decoder
    from batch_rows import BatchModelDrafter, RowDrafters

    schedule = Schedule(decoder.max_num_draft)
    prompt_ids = mx.array(decoder.tokenizer(PROMPT).input_ids)[None]
    start = time.perf_counter()
    rounds = 0

    def going_on() -> bool:
        # (Every rank of a sharded model runs the same rounds: their steps wait for each other.)
        if rounds <= 1:  # the warm-up round and one timed round
            return True
        elapsed = time.perf_counter() - start
        wanted = (rounds <= MIN_ROUNDS and elapsed < MAX_BUDGET) or (rounds <= MAX_ROUNDS and elapsed < BUDGET)
        return decoder.agree_all(wanted)

    def block(k: int):
        schedule.block(k)
        if batch_size == 1:
            drafter = RepeatDrafter() if source == "lookup" else ModelDrafter(decoder.draft_model, decoder.sampler)
        elif source == "lookup":
            drafter = RowDrafters(RepeatDrafter, decoder.model.args.vocab_size)
        else:
            drafter = BatchModelDrafter(decoder.draft_model, decoder.sampler)
        # Decoding without end (EOS ignored, no token limit) until the block is through.
        if batch_size == 1:
            steps = decoder.speculative_tokens(prompt_ids, 1 << 30, True, Stats(), drafter, schedule)
        else:
            steps = batch_decoder.batch_generations(
                decoder, [PROMPT] * batch_size, 1 << 30, False, True, batch_size, Stats(), drafter, schedule
            )
        try:
            for _ in steps:
                pass
        except Done:
            pass
        schedule.end_block()

    top = decoder.max_num_draft
    while going_on():
        schedule.round(warm_up=rounds == 0)
        if rounds == 0:
            # The warm-up round: plain steps and the longest drafts first. Where a round of every length would fit
            # the budget (a small model), every length is timed; else those measured_lengths picks.
            tick = time.perf_counter()
            block(0)
            block(top)
            if decoder.agree_all((time.perf_counter() - tick) * (top + 1) / 2 <= BUDGET):
                schedule.time_every_length()
                for k in range(1, top):
                    block(k)
        else:
            if rounds == 1:
                start = time.perf_counter()
            for k in schedule.lengths:
                block(k)
        rounds += 1
    return schedule.table()


def setup_costs(decoder) -> Dict[str, float]:
    """Seconds per token of what a draft model's step computes beyond drafting (the table's steps leave it out):
    "encode", per prompt token, at a prompt's first draft (the prompt through the draft's encoder, unless it shares the
    main model's, and the cross-attention keys and values); "catch_up", per token fed beyond the newest, after plain
    steps (the draft model sees only the tokens it drafts after). Timed as one draft after each, against one draft with
    neither, the medians of a few repeats in turn."""
    prompt_ids = mx.array(decoder.tokenizer(PROMPT).input_ids)[None]
    _, _, encoder_output = decoder.prepare(prompt_ids)
    drafter = ModelDrafter(decoder.draft_model, decoder.sampler)
    sequence = [decoder.model.args.decoder_start_token_id] * (CATCH_UP + 1)
    key = mx.random.key(0)
    encoded = None  # the draft's cross-attention keys and values, once computed

    def seconds(fed: int, cold: bool) -> float:
        nonlocal encoded
        drafter.prepare(prompt_ids, encoder_output)
        drafter.cross_kv = None if cold else encoded
        tick = time.perf_counter()
        mx.eval(drafter.propose(sequence[:fed], 1, key).tokens)
        took = time.perf_counter() - tick
        encoded = drafter.cross_kv
        return took

    times = {(1, True): [], (1, False): [], (CATCH_UP + 1, False): []}  # (tokens fed, prompt encoded first)
    for repeat in range(SETUP_REPEATS + 1):
        for case, kept in times.items():
            took = seconds(*case)
            if repeat:
                kept.append(took)
    median = {case: statistics.median(kept) for case, kept in times.items()}
    encode = max(0.0, median[1, True] - median[1, False]) / prompt_ids.shape[1]
    catch_up = max(0.0, median[CATCH_UP + 1, False] - median[1, False]) / CATCH_UP
    return dict(encode=encode, catch_up=catch_up)


def step_costs(decoder, sources: List[str], batch_size: int):
    """({source: [seconds of a step with k drafts, k = 0..max]}, the draft model's setup_costs (one sequence drafting
    from it; else {}), whether they came from the cache)."""
    key = cost_key(decoder, sources, batch_size)
    path = cache_dir() / "step-costs" / f"{digest(key)}.json"
    record = read(path)
    costs = record.get("seconds") if record else None
    setup = record.get("setup") if record else None
    with_setup = "model" in sources and batch_size == 1
    valid = isinstance(costs, dict) and set(costs) == set(sources)
    valid = valid and all(
        isinstance(table, list)
        and len(table) == decoder.max_num_draft + 1
        and all(isinstance(t, (int, float)) and t > 0 for t in table)
        for table in costs.values()
    )
    valid = valid and isinstance(setup, dict) and set(setup) == (set(SETUP) if with_setup else set())
    valid = valid and all(isinstance(t, (int, float)) and t >= 0 for t in setup.values())
    if record is not None and not valid:
        warn(path, f"ignoring the cache file {path}, which does not hold step costs; measuring them again")
    cached = decoder.agree_all(valid)
    if not cached:
        costs = {source: measure(decoder, source, batch_size) for source in sources}
        setup = setup_costs(decoder) if with_setup else {}
    # Every rank of a sharded model must choose alike: all take the ranks' mean costs (each rank may have read its own
    # cache file).
    costs = {source: decoder.agree(table) for source, table in costs.items()}
    setup = dict(zip(SETUP, decoder.agree([setup[name] for name in SETUP]))) if setup else {}
    if not cached:
        write(path, dict(key=key, seconds=costs, setup=setup))
    return costs, setup, cached
