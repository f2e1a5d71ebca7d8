"""How many tokens to draft before each verification: a fixed number, or `auto`.

`auto` picks, before every step, the k in 0..max_num_draft that maximises the expected tokens per second

    E(k) / T(k),   E(k) = 1 + sum_{j=1..k} prod_{i=1..j} alpha_i

where alpha_i is the chance that draft i is accepted once drafts 1..i-1 were (Leviathan et al. 2023, per position),
and T(k) the time of a step with k drafts. T comes from a table measured once per setting (step_costs.py); while
decoding a common factor is tracked (a busier machine slows every step alike, which changes no choice), and beside it
how much dearer than the table says drafting steps come out than plain ones, once both kinds were timed: the table's
ratio of the two moved between 1.5 and 3 from one measurement to the next on one machine, and a drafting step in a
real run (the draft catching up after plain steps, longer contexts) cost about 1.5x its table entry where plain steps
cost theirs. That ratio follows a line along k through the lengths taken lately: the table's slope is as noisy. The
alphas start from what the pair and drafter ended their last run with (step_costs.py keeps them), and follow each
step's outcome, recency-weighted. Another length is tried only while its acceptance is uncertain enough that it might
be better. A batch takes one length for all its rows: the one with the most tokens per second summed
over the rows, each with its own source of drafts (draft model or lookup, estimated apart). Past an EOS that does not
end the output (`ignore_eos`), a source's drafts are estimated apart too (`past_eos`): the main model continues there
as it never learnt to, and a draft that agreed with it on the sentence agrees by chance; estimated together, the
sentence's estimates sent long drafts past the EOS and the rejections there stopped drafting on the next sentence.
"""

import math
import operator
from collections import Counter
from itertools import accumulate
from typing import Dict, List, Optional, Sequence, Tuple

DECAY = 0.95  # weight of the past in an estimate per new observation of it: about the last twenty count
PRIOR_WEIGHT = 2.0  # observations a position's prior (the position before it) counts as
FIRST_PRIOR_WEIGHT = 1.0  # observations the first position's prior (0.5) counts as: one rejection does not settle it
MEMORY_WEIGHT = 20.0  # the most observations a remembered estimate counts as at the start of a run
EXPLORE_EVERY = 4  # the fewest steps between tries of another length than the best
# Steps between tries, at most: the gap doubles after each try that leaves the best length as it was.
EXPLORE_MAX_GAP = 16
# The least recency-weighted count of steps of each kind (plain, drafting) timed for the times of one to be set beside
# the other's: about one of each in the last dozen steps.
KIND_WEIGHT = 0.5
# The most a try of another length may cost by the estimates (its time times what it falls short of the best length's
# rate), against the time of the steps since the last try.
EXPLORE_BUDGET = 0.02
# Tries from plain steps whose first draft was rejected, in a row: from the second on, each halves the budget of the
# next, down to this fraction of it. With a draft that is never accepted (an unrelated model), tries at the full budget
# cost 1.7-2.2% of the time on the demo pair, most of what auto then lost to regular decoding; one rejection alone
# may be bad luck with a draft that is mostly right. A try with a draft accepted restores the budget.
LEAST_BUDGET_SHARE = 0.125
OPTIMISM = 2.0  # standard deviations above its mean an acceptance might be, when deciding to try it
# Each plain step fades what the acceptance estimates know (their counts, not their means) by this factor: a length once
# judged not worth trying is tried again after some seventy plain steps, in this run or a later one. Without it, a
# remembered estimate from text where the draft did poorly (decoding past EOS, say) kept a pair from ever drafting
# again, on any text: plain steps observe no acceptance.
PLAIN_FADE = 0.98
# The most plain steps in a run taken when no length was worth trying (the estimates fade meanwhile).
MAX_PLAIN_RUN = 64
# The spread of draft lengths (in squared drafts, counted in steps) that a slope of zero counts as, in how a drafting
# step's measured time beside its table entry changes with its length: the table's slope along k is measured in a few
# seconds of a noisy machine (its longest entry moved between 4.8 and 6.8 plain steps from one measurement to the next
# on one machine), and real steps follow it only roughly (on the demo pair's translations, steps of 12-15 drafts took
# about 0.84 of their entries and steps of 1-3 drafts 1.0-1.2).
SLOPE_PRIOR = 20.0
# How much faster drafting must look than plain steps to be chosen: plain steps in a row overlap with each other (the
# next is built while the last computes), which a mix of drafting and plain steps partly gives up.
MIN_GAIN = 0.03
# Tries from plain steps: how their measured cost beside their estimate is averaged (TRY_DECAY per try, a prior of
# 1 counting as TRY_PRIOR_WEIGHT tries), and the most one try may say either way (a slow or fast spell of the machine).
TRY_DECAY = 0.8
TRY_PRIOR_WEIGHT = 1.0
MAX_TRY_PRICE = 3.0
# What a draft from the model would compute before its first token (drafters.py: unready): (prompt tokens to encode,
# tokens to catch up on); None where not known (batches).
Unready = Optional[Tuple[int, int]]
PAST_EOS = " past EOS"  # appended to a source of drafts past an EOS: estimated apart, costed as the source


def past_eos(source: Optional[str]) -> Optional[str]:
    """The name under which drafts from `source` are estimated past an EOS that does not end the output."""
    return source + PAST_EOS if source else source


def drafter_of(source: str) -> str:
    """The source of drafts itself, with or without PAST_EOS: what its step costs are kept under."""
    return source[: -len(PAST_EOS)] if source.endswith(PAST_EOS) else source


class FixedDraftLength:
    """Always the same number of drafts."""

    costs_cached = None
    calibration_seconds = 0.0
    factor = None

    def __init__(self, num_draft: int):
        self.num_draft = num_draft

    def choose(self, source: Optional[str], limit: int, unready: Unready = None) -> int:
        return min(self.num_draft, limit) if source else 0

    def choose_batch(self, sources: Sequence[Optional[str]], limit: int, unready: Unready = None) -> int:
        return self.choose("any" if any(sources) else None, limit)

    def plain_run(self, limit: int, watched: bool = False) -> int:
        return limit if watched else 1

    def choose_in_run(self, source: Optional[str], limit: int, unready: Unready = None) -> int:
        return self.choose(source, limit)

    def record(self, source: Optional[str], drafted: int, accepted: int, seconds: float):
        pass

    def record_time(self, source: Optional[str], drafted: int, seconds: float, own: bool = True):
        pass

    def record_run(self, steps: int, seconds: Optional[float]):
        pass

    def record_acceptance(self, source: Optional[str], drafted: int, accepted: int):
        pass


class Acceptance:
    """Per source of drafts and per draft position: recency-weighted counts [accepted, tried]; beside them, what pays
    for tries of another length than the best (EXPLORE_BUDGET): the steps taken since the last (`since_try`), and the
    tries from plain steps in a row whose first draft was rejected (`rejected_tries`, LEAST_BUDGET_SHARE). All are
    remembered between runs: a run of main.py decodes one prompt, a few dozen steps, and a try paid for by the steps of
    one run alone never came (the demo pair, a fresh decoder per translation, never drafted: 0.87x regular decoding
    where drafting from its second prompt on would have paid 1.3x)."""

    def __init__(
        self, counts: Optional[Dict[str, List[List[float]]]] = None, since_try: float = 0.0, rejected_tries: int = 0
    ):
        self.counts = {}
        self.since_try = float(since_try)
        self.rejected_tries = int(rejected_tries)
        self.version = 0  # counts every observation, so that what is computed from the estimates can be kept
        for source, positions in (counts or {}).items():
            # A remembered estimate counts as at most MEMORY_WEIGHT observations.
            self.counts[source] = [
                [accepted * scale, tried * scale]
                for accepted, tried in positions
                for scale in [min(1.0, MEMORY_WEIGHT / tried) if tried > 0 else 0.0]
            ]

    def observe(self, source: str, drafted: int, accepted: int):
        """A step's outcome: `drafted` drafts from `source`, the first `accepted` of them accepted."""
        self.version += 1
        positions = self.counts.setdefault(source, [])
        # Position i was tried when drafts 1..i-1 were accepted: those and the first rejection, if any.
        tried = min(drafted, accepted + 1)
        while len(positions) < tried:
            positions.append([0.0, 0.0])
        for i in range(tried):
            position = positions[i]
            position[0] = DECAY * position[0] + (i < accepted)
            position[1] = DECAY * position[1] + 1.0

    def estimates(self, source: str, k: int, optimism: float = 0.0) -> List[float]:
        """alpha_1..alpha_k, each `optimism` standard deviations above its mean (capped at 1). A position's prior is
        the one before it (acceptance changes slowly along a draft), the first one's 0.5 with little weight."""
        # (Asked about every step, so kept lean: no calls in the loop but the square root.)
        positions = self.counts.get(source, [])
        observed = len(positions)
        alphas, prior, prior_weight = [], 0.5, FIRST_PRIOR_WEIGHT
        for i in range(k):
            if i < observed:
                accepted, tried = positions[i]
                weight = tried + prior_weight
                mean = (accepted + prior * prior_weight) / weight
            else:
                weight, mean = prior_weight, prior
            if optimism:
                alpha = mean + optimism * math.sqrt(mean * (1 - mean) / (weight + 1))
                alphas.append(alpha if alpha < 1.0 else 1.0)
            else:
                alphas.append(mean)
            prior, prior_weight = mean, PRIOR_WEIGHT
        return alphas

    def fade(self, factor: float):
        """Scale every count by `factor` (< 1): the same estimates, known as from fewer observations."""
        self.version += 1
        for positions in self.counts.values():
            for position in positions:
                position[0] *= factor
                position[1] *= factor

    def to_dict(self) -> Dict[str, List[List[float]]]:
        return {source: [list(p) for p in positions] for source, positions in self.counts.items()}

    def to_record(self) -> dict:
        """What is remembered between runs (from_record reads it back)."""
        return dict(counts=self.to_dict(), since_try=self.since_try, rejected_tries=self.rejected_tries)

    @classmethod
    def from_record(cls, record: dict) -> "Acceptance":
        return cls(record["counts"], record.get("since_try", 0), record.get("rejected_tries", 0))


class AutoDraftLength:
    """Chooses the number of drafts per step from measured step costs and the acceptance estimates.

    costs: {source: [seconds of a step with k drafts from it, k = 0..max_num_draft]}, for one batch size; setup: the
    draft model's seconds per token of what a step computes beyond them (step_costs.setup_costs), where known.
    """

    def __init__(
        self,
        max_num_draft: int,
        costs: Dict[str, List[float]],
        acceptance: Acceptance,
        setup: Optional[Dict[str, float]] = None,
    ):
        if max_num_draft < 1:
            raise ValueError(f"max_num_draft must be at least 1, got {max_num_draft}")
        self.max_num_draft = max_num_draft
        self.costs = costs
        self.setup = setup or {}
        self.acceptance = acceptance
        self.costs_cached = None  # whether the costs were read from the cache (set by whoever measured them)
        self.calibration_seconds = 0.0
        self.factor = 1.0  # measured step times / the table's, recency-weighted
        self.factor_weight = 0.0
        # Plain (False) and drafting (True) steps' measured times / the table's, each kind apart: [mean, weight], both
        # weights recency-weighted over every step. Their ratio (how much dearer than the table says drafting steps
        # are beside plain ones) counts only while both kinds were timed lately (KIND_WEIGHT); else the table's own
        # ratio stands: an old time of one kind never stands against new times of the other (a machine that slowed
        # down while auto drafted throughout), and an early, noisy ratio does not stay (kept, one of 2.1 stopped a
        # pair from drafting on translations, where drafting pays 1.3-1.5x).
        self.kinds = {False: [1.0, 0.0], True: [1.0, 0.0]}
        # Beside them, over drafting steps with the same weights: the sums of k, k² and k times the measured ratio,
        # from which that ratio's slope along k (SLOPE_PRIOR). drafting_ratios: per k = 0..max_num_draft, how much
        # dearer than its table entry a step comes out, beside plain steps where both kinds were timed lately, else
        # beside the drafting steps' mean length; None: as the table says.
        self.drafting_sums = [0.0, 0.0, 0.0]
        self.drafting_ratios = None
        self.explore_gap = EXPLORE_EVERY
        self.try_accepted = None  # whether the try from plain steps under way had a draft accepted (any row's)
        self.kept_rates = {}  # (sources, top, optimism) -> rates, while the acceptance has not changed
        self.kept_version = None
        self.explored = None  # (length tried, the best length before it), until the next choice
        self.unfaded = 1.0  # the fading of plain steps not yet applied to the acceptance (see fade)
        self.run_watched = False  # whether the steps of the last run of plain steps were chosen one by one
        # What tries from plain steps took over their estimates (their table entries, the drafting steps' ratio and
        # what the draft model computes first), by the table's time: [mean, weight], the weight recency-weighted over
        # tries (TRY_DECAY). A lone drafting step among plain ones costs more than the same step among drafting ones
        # (the draft model's weights and caches cold, the plain steps around it no longer built ahead): 1.3-1.75x
        # on the demo pair with a draft that is never accepted, where tries then cost 3% of the time, not 2%.
        self.try_price = [1.0, TRY_PRIOR_WEIGHT]
        self.pending_try = None  # the estimate of the try chosen last, until its step's time is recorded

    def rates(self, sources: Sequence[Optional[str]], top: int, optimism: float = 0.0) -> List[float]:
        """Expected tokens per second (of the table) for k = 0..top: every row's E(k), over T(k). Kept until the
        acceptance changes: a run of plain steps observes nothing, and asks again every step."""
        if self.kept_version != self.acceptance.version:
            self.kept_rates, self.kept_version = {}, self.acceptance.version
        key = (tuple(sources), top, optimism)
        if key not in self.kept_rates:
            self.kept_rates[key] = self.compute_rates(sources, top, optimism)
        return self.kept_rates[key]

    def table(self, sources: Sequence[Optional[str]]) -> List[float]:
        """The step costs of rows drafting from `sources`: the draft model's where any row drafts from it."""
        drafting = [drafter_of(source) for source in sources if source]
        return self.costs["model" if "model" in drafting else drafting[0]]

    def compute_rates(self, sources: Sequence[Optional[str]], top: int, optimism: float) -> List[float]:
        drafting = [source for source in sources if source]
        table = self.table(sources)
        # The rows' summed E(k) for every k at once (each row's 1 + the reach of each draft, summed in order); a step
        # asks this about every time (the estimates change with each step's outcome), so it is kept lean.
        tokens = [float(len(sources))] * (top + 1)
        for source, rows in Counter(drafting).items():
            # The reach of draft j: the product of alpha_1..alpha_j; E(k) - 1: the sum of the first k reaches.
            totals = accumulate(accumulate(self.acceptance.estimates(source, top, optimism), operator.mul))
            tokens[1:] = [count + rows * total for count, total in zip(tokens[1:], totals)]
        return [count / cost for count, cost in zip(tokens, table)]

    def measured(self, rates: List[float]) -> List[float]:
        """The table's rates (k = 0..top) with drafting steps as much dearer beside plain ones as they were measured."""
        if self.drafting_ratios is None:
            return rates
        return [rate / ratio for rate, ratio in zip(rates, self.drafting_ratios)]

    def ratio(self, k: int) -> float:
        return 1.0 if self.drafting_ratios is None else self.drafting_ratios[k]

    def setup_seconds(self, sources: Sequence[Optional[str]], unready: Unready) -> float:
        """The table's seconds of what drafting would compute now beyond its steps (a lone row drafting from the
        model; `unready`: the drafter's)."""
        if unready is None or len(sources) != 1 or not sources[0] or drafter_of(sources[0]) != "model":
            return 0.0
        encode, behind = unready
        return self.setup.get("encode", 0.0) * encode + self.setup.get("catch_up", 0.0) * behind

    def choose_batch(self, sources: Sequence[Optional[str]], limit: int, unready: Unready = None) -> int:
        """The number of drafts for the next step of rows whose drafts would come from `sources` (None: no draft for
        that row); `limit` bounds it (tokens left); `unready`: what a draft from the model would compute first."""
        top = min(self.max_num_draft, limit)
        if top <= 0 or not any(sources):
            return 0
        rates = self.measured(self.rates(sources, top))
        best = rates.index(max(rates))  # (the shortest of equals)
        if rates[best] < rates[0] * (1 + MIN_GAIN):
            best = 0
        if self.explored is not None:
            # A try that changed nothing makes the next one wait twice as long; one that did, the next one soon.
            changed = best != self.explored[1]
            self.explore_gap = EXPLORE_EVERY if changed else min(2 * self.explore_gap, EXPLORE_MAX_GAP)
            self.explored = None
        acceptance = self.acceptance
        acceptance.since_try += 1
        # Where plain steps look best, a source never tried (nothing remembered either) is tried at once: what one try
        # costs is a few plain steps, and what it shows is kept for every later run.
        unknown = best == 0 and any(source and source not in acceptance.counts for source in sources)
        if acceptance.since_try >= self.explore_gap or unknown:
            # The length nearest the best (the longer of two) that might beat it, were its acceptance as high as its
            # uncertainty allows. Not only one longer: when the first draft is dear (drafting at all stops the host
            # building ahead) one draft may never pay where three do.
            hopeful = self.measured(self.rates(sources, top, OPTIMISM))
            bar = rates[best] * (1 + (MIN_GAIN if best == 0 else 0.0))
            trials = [k for k in range(1, top + 1) if k != best and hopeful[k] > bar]
            if trials:
                trial = min(trials, key=lambda k: (abs(k - best), -k))
                # Only once the steps since the last try have paid for it (EXPLORE_BUDGET): where plain steps are the
                # best and drafting is dear, the nearest length that might beat them is a long draft, which costs
                # a few plain steps when it is rejected early; and a draft model that has not drafted for a while
                # first catches up (at a prompt's first draft, encodes the prompt), which may cost more than that.
                # A try from plain steps costs what such tries were measured to cost beside their estimates
                # (try_price).
                table = self.table(sources)
                step, estimate = table[trial] * self.ratio(trial), None
                loss = step * (1 - rates[trial] / rates[best])
                share = 1.0
                if best == 0:
                    estimate = step + self.setup_seconds(sources, unready)
                    loss = self.try_price[0] * estimate - step * rates[trial] / rates[best]
                    share = max(LEAST_BUDGET_SHARE, 0.5 ** max(0, self.acceptance.rejected_tries - 1))
                budget = share * EXPLORE_BUDGET * acceptance.since_try * table[best] * self.ratio(best)
                if loss <= budget or unknown:
                    acceptance.since_try = 0
                    self.explored = (trial, best)
                    self.try_accepted = None
                    self.pending_try = estimate
                    return trial
        if best == 0:
            self.fade(1)
        return best

    def fade(self, steps: int):
        """`steps` plain steps were chosen: the acceptance estimates fade (PLAIN_FADE), a few steps' worth at a time
        (fading changes the estimates, which are then computed again)."""
        self.unfaded *= PLAIN_FADE**steps
        if self.unfaded < 0.9:
            self.acceptance.fade(self.unfaded)
            self.unfaded = 1.0

    def choose(self, source: Optional[str], limit: int, unready: Unready = None) -> int:
        """The number of drafts for the next step of one sequence; source None means no draft."""
        return self.choose_batch([source], limit, unready)

    def plain_run(self, limit: int, watched: bool = False) -> int:
        """Plain steps to take in a row, at most `limit`, once the choice was none: until the next try of a length is
        due, or MAX_PLAIN_RUN when a try was due and none was worth it (the estimates fade meanwhile, and one may be
        then). One choice stands for them all; the steps count as they are taken (record_run: an EOS ends most runs
        early). `watched`: all of them, the run ended by the drafter instead (choose_in_run, asked as it goes: a
        lookup's source comes and goes with the tokens)."""
        self.run_watched = watched
        if watched:
            return limit
        steps = self.explore_gap - int(self.acceptance.since_try)
        if steps < 2:
            steps = MAX_PLAIN_RUN
        return max(1, min(steps, limit))

    def choose_in_run(self, source: Optional[str], limit: int, unready: Unready = None) -> int:
        """The choice asked during a watched run of plain steps: drafts from `source` (None: none) for the step after
        it, the run ending unless 0."""
        return self.choose(source, limit, unready)

    def record(self, source: Optional[str], drafted: int, accepted: int, seconds: float):
        """A step's outcome: `drafted` tokens from `source`, the first `accepted` of them accepted, in `seconds`."""
        self.record_time(source, drafted, seconds)
        self.record_acceptance(source, drafted, accepted)

    def record_time(self, source: Optional[str], drafted: int, seconds: float, own: bool = True, steps: int = 1):
        """A step's time: `drafted` drafts from `source` in `seconds`; not `own` where it includes other work (the
        draft model encoding the prompt, prompts joining a batch), which counts for nothing. `steps`: how many steps
        of that time it stands for (a run of plain steps, by its mean), each weighed as one."""
        if self.pending_try is not None and drafted:  # (timed whether its own or not: its price includes the rest)
            price = self.try_price
            price[1] = TRY_DECAY * price[1] + 1.0
            observed = min(max(seconds / self.factor / self.pending_try, 1.0 / MAX_TRY_PRICE), MAX_TRY_PRICE)
            price[0] += (observed - price[0]) / price[1]
        self.pending_try = None
        if not own:
            return
        table = self.costs.get(source) or next(iter(self.costs.values()))
        observed = seconds / table[min(drafted, self.max_num_draft)]
        self.age(steps, ratios=False)
        weight = (1.0 - DECAY**steps) / (1.0 - DECAY)  # (1 for one step)
        self.factor_weight += weight
        self.factor += (observed - self.factor) * weight / self.factor_weight
        kind = self.kinds[drafted > 0]
        kind[1] += weight
        kind[0] += (observed - kind[0]) * weight / kind[1]
        k = min(drafted, self.max_num_draft)
        sums = self.drafting_sums
        sums[:] = [sums[0] + weight * k, sums[1] + weight * k * k, sums[2] + weight * k * observed]
        self.drafting_ratios = self.compute_ratios()

    def age(self, steps: int, ratios: bool = True):
        """`steps` steps went by: the weight of every time recorded before them fades by DECAY for each."""
        decay = DECAY**steps
        self.factor_weight *= decay
        for kind in self.kinds.values():
            kind[1] *= decay
        self.drafting_sums[:] = [decay * total for total in self.drafting_sums]
        if ratios:
            self.drafting_ratios = self.compute_ratios()

    def compute_ratios(self) -> Optional[List[float]]:
        (plain, plain_weight), (drafting, weight) = self.kinds[False], self.kinds[True]
        if weight < KIND_WEIGHT:
            return None
        sum_k, sum_kk, sum_k_ratio = self.drafting_sums
        mean_k = sum_k / weight
        spread = max(0.0, sum_kk - sum_k * mean_k)
        slope = (sum_k_ratio - sum_k * drafting) / (spread + SLOPE_PRIOR)
        # The line holds among the lengths taken lately (two standard deviations about their mean), not beyond them,
        # and within half and twice the mean, whatever the noise. (Asked about every step: no calls in the loop.)
        reach = 2.0 * math.sqrt(spread / weight)
        level = plain if plain_weight >= KIND_WEIGHT else drafting
        shortest, longest, lowest, highest = mean_k - reach, mean_k + reach, drafting / 2, 2 * drafting
        ratios = [1.0]
        for k in range(1, 1 + self.max_num_draft):
            line = drafting + slope * ((shortest if k < shortest else longest if k > longest else k) - mean_k)
            ratios.append((lowest if line < lowest else highest if line > highest else line) / level)
        return ratios

    def record_run(self, steps: int, seconds: Optional[float]):
        """A run of plain steps ended after `steps` of them; `seconds`: its time per token from its second token on (as
        the table times them), None where it had too few. Its steps count as taken: a run cut short by an EOS after
        16 tokens is not 64 steps of fading the estimates (which, in a run that decoded short outputs, faded what
        each try of drafting had learnt before the next) nor of waiting for a try; and its time counts as that many
        steps' (recency is counted in steps), so that an old drafting step's time does not stand against it."""
        if not self.run_watched:  # (the steps of a watched run count as they are chosen one by one)
            self.acceptance.since_try += steps - 1
            self.fade(steps - 1)
        if seconds is None:
            self.age(steps)
        else:
            self.record_time(None, 0, seconds, steps=steps)

    def record_acceptance(self, source: Optional[str], drafted: int, accepted: int):
        if drafted:
            self.acceptance.observe(source, drafted, accepted)
            if self.explored is not None and self.explored[1] == 0:  # a try from plain steps (a batch's rows: one try)
                if accepted:
                    self.acceptance.rejected_tries = 0
                elif self.try_accepted is None:
                    self.acceptance.rejected_tries += 1
                self.try_accepted = bool(accepted) or bool(self.try_accepted)
