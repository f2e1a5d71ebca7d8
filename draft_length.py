"""How many tokens to draft before each verification: a fixed number, or `auto`.

`auto` picks, before every step, the k in 0..max_num_draft that maximises the expected tokens per second

    E(k) / T(k),   E(k) = 1 + sum_{j=1..k} prod_{i=1..j} alpha_i

where alpha_i is the measured chance that draft i is accepted once drafts 1..i-1 were (per position, recency-weighted;
with one alpha for all positions E(k) = (1 - alpha^(k+1)) / (1 - alpha), Leviathan et al. 2023), and T(k) is the
measured wall time of a step with k drafts (drafting and verifying k + 1 tokens, as the decoder runs them: from one
host synchronisation to the next), a line a + b k fitted to the recent steps' times. k = 0 is a plain decoding step,
timed on its own. Estimates are kept per source of drafts (draft model or lookup), since they differ.
"""

from typing import Dict, List, Optional

DECAY = 0.9  # weight of the past in an acceptance estimate, per new observation: about the last ten count
COST_DECAY = 0.95  # the same for step times, which are noisier: about the last twenty count
EXPLORE_EVERY = 8  # steps between tries of a length next to the best one, which keep its neighbours' estimates fresh
# How much faster drafting must look than plain steps to be chosen. Near a tie (a draft that costs about what it
# saves, such as a model drafting for itself) the estimates' noise alone would pick drafts, and plain steps in a row
# also overlap with each other (the next is built while the last computes), which drafting steps give up.
MIN_GAIN = 0.05


class FixedDraftLength:
    """Always the same number of drafts."""

    def __init__(self, num_draft: int):
        self.num_draft = num_draft

    def choose(self, source: Optional[str], limit: int) -> int:
        return min(self.num_draft, limit) if source else 0

    def record(self, source: Optional[str], drafted: int, accepted: int, seconds: float):
        pass

    def record_time(self, source: Optional[str], drafted: int, seconds: float):
        pass

    def record_acceptance(self, source: Optional[str], drafted: int, accepted: int):
        pass


class Decayed:
    """A recency-weighted mean: each new observation counts 1, older ones DECAY times less per newer one."""

    def __init__(self):
        self.total = 0.0
        self.weight = 0.0

    def add(self, value: float):
        self.total = DECAY * self.total + value
        self.weight = DECAY * self.weight + 1.0

    def mean(self, prior: float, prior_weight: float = 0.0) -> float:
        return (
            (self.total + prior * prior_weight) / (self.weight + prior_weight) if self.weight + prior_weight else prior
        )


class LineFit:
    """A recency-weighted least-squares line seconds = a + b * k through (k, seconds) observations."""

    def __init__(self):
        self.sums = [0.0] * 5  # weight, k, k^2, seconds, k * seconds

    def add(self, k: int, seconds: float):
        self.sums = [COST_DECAY * total + value for total, value in zip(self.sums, (1, k, k * k, seconds, k * seconds))]

    def at(self, k: int, plain: Optional[float]) -> float:
        weight, sum_k, sum_kk, sum_t, sum_kt = self.sums
        mean_k, mean_t = sum_k / weight, sum_t / weight
        variance = sum_kk / weight - mean_k**2
        if variance > 0.05:
            slope = (sum_kt / weight - mean_k * mean_t) / variance
        else:
            # One length seen so far: the line through it and the plain step.
            slope = (mean_t - plain) / mean_k if plain is not None else mean_t / mean_k
        # More drafts never cost less.
        return mean_t + max(slope, 0.0) * (k - mean_k)


class AutoDraftLength:
    """Chooses the number of drafts per step from the acceptance and step times measured so far."""

    def __init__(self, max_num_draft: int = 8):
        if max_num_draft < 1:
            raise ValueError(f"max_num_draft must be at least 1, got {max_num_draft}")
        self.max_num_draft = max_num_draft
        self.acceptance: Dict[str, List[Decayed]] = {}  # source -> per draft position
        self.overall: Dict[str, Decayed] = {}  # source -> every position together, the prior of the positions
        self.plain = Decayed()  # seconds of a step without drafts
        self.costs: Dict[str, LineFit] = {}  # source -> seconds of a step by its number of drafts
        self.steps = 0

    def expected_tokens(self, source: str, k: int) -> float:
        """E(k): tokens a step with k drafts yields, the main model's own token included."""
        prior = self.overall[source].mean(0.5, 1.0) if source in self.overall else 0.5
        positions = self.acceptance.get(source, [])
        expected, reach = 1.0, 1.0
        for i in range(k):
            alpha = positions[i].mean(prior, 1.0) if i < len(positions) else prior
            reach *= alpha
            expected += reach
        return expected

    def step_seconds(self, source: Optional[str], k: int) -> float:
        """T(k): the plain step's measured time for k = 0, else the line fitted to this source's steps' times."""
        plain = self.plain.mean(0.0) if self.plain.weight else None
        return plain if k == 0 else self.costs[source].at(k, plain)

    def choose(self, source: Optional[str], limit: int) -> int:
        """The number of drafts for the next step; `limit` bounds it (tokens left), source None means none."""
        self.steps += 1
        top = min(self.max_num_draft, limit)
        if source is None or top == 0:
            return 0
        # Until a step of this source and a plain step were timed: one draft, then none. Longer drafts are tried one
        # more at a time, by the exploration below, while they look worth it.
        if source not in self.costs:
            return 1
        if not self.plain.weight:
            return 0
        rates = {k: self.expected_tokens(source, k) / max(self.step_seconds(source, k), 1e-9) for k in range(top + 1)}
        best = max(rates, key=rates.get)
        if rates[best] < rates[0] * (1 + MIN_GAIN):
            best = 0
        if self.steps % EXPLORE_EVERY == 0:
            # Alternate above and below the best.
            neighbour = best + 1 if (self.steps // EXPLORE_EVERY) % 2 else best - 1
            best = neighbour if 0 <= neighbour <= top else best
        return best

    def record(self, source: Optional[str], drafted: int, accepted: int, seconds: float):
        """A step's outcome: `drafted` tokens from `source`, the first `accepted` of them accepted, in `seconds`."""
        self.record_time(source, drafted, seconds)
        self.record_acceptance(source, drafted, accepted)

    def record_time(self, source: Optional[str], drafted: int, seconds: float):
        if drafted:
            self.costs.setdefault(source, LineFit()).add(drafted, seconds)
        else:
            self.plain.add(seconds)

    def record_acceptance(self, source: Optional[str], drafted: int, accepted: int):
        if not drafted:
            return
        positions = self.acceptance.setdefault(source, [])
        overall = self.overall.setdefault(source, Decayed())
        # Position i was tried when drafts 1..i-1 were accepted: those i and the first rejection, if any.
        for i in range(min(drafted, accepted + 1)):
            if i == len(positions):
                positions.append(Decayed())
            positions[i].add(float(i < accepted))
            overall.add(float(i < accepted))
