"""What decoding returns, one Generation per prompt with its Stats, and the tokens a verification step adds: shared by
the single-prompt loops (decoder.py) and the batched loop (batch_decoder.py)."""

from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional


@dataclass
class Stats:
    generated: int = 0
    main_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    lookup_drafted: int = 0  # drafted tokens that came from a lookup rather than the draft model
    lookup_steps: int = 0  # main-model calls that verified a lookup's drafts
    # The prompt tokenized, through both encoders, and the cross-attention keys/values; in a batch, the host's part of a
    # join (the encoding runs behind the step in flight).
    encode_seconds: float = 0.0
    seconds: float = 0.0  # prompt in to last token out
    # --num-draft auto: whether the step costs came from the cache (None: not auto), and the seconds spent measuring
    # them before this run (not in `seconds`).
    costs_cached: Optional[bool] = None
    calibration_seconds: float = 0.0

    def add_step(self, source: Optional[str], drafted: int, accepted: int):
        """One main-model call of one sequence: `drafted` tokens from `source`, the first `accepted` kept."""
        self.main_calls += 1
        self.drafted += drafted
        self.accepted += accepted
        if source == "lookup" and drafted:
            self.lookup_drafted += drafted
            self.lookup_steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per main-model call."""
        return self.accepted / self.main_calls if self.main_calls else 0.0

    @property
    def mean_num_draft(self) -> float:
        """Tokens drafted per main-model call."""
        return self.drafted / self.main_calls if self.main_calls else 0.0

    @property
    def lookup_share(self) -> float:
        """The share of drafted tokens that came from a lookup."""
        return self.lookup_drafted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted": self.mean_accepted,
            "mean_num_draft": self.mean_num_draft,
            "lookup_share": self.lookup_share,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class Generation:
    text: str
    tokens: List[int]
    stats: Stats = field(default_factory=Stats)


def record_step(
    stats: Stats,
    draft_length,
    source: Optional[str],
    drafted: int,
    accepted: int,
    new_tokens: List[int],
    estimated_as: Optional[str] = None,
):
    """A sequence's step, in its stats and in the draft-length policy's acceptance estimates (per source, or under
    `estimated_as` where given: draft_length.past_eos); new_tokens: what the step added to the output (step_tokens).
    The stats count every accepted draft; the policy only those the output kept (none past an EOS), so that it counts
    what drafting yields: drafts past the end of a short output add nothing, however well the draft agrees there."""
    stats.add_step(source, drafted, accepted)
    draft_length.record_acceptance(estimated_as or source, drafted, min(accepted, len(new_tokens)))


def run_seconds(arrivals: List[float], left_out: float = 0.0) -> Optional[float]:
    """A run of plain steps' time per step, from the times its tokens came (`arrivals`): from its second step to its
    last (the first waited for its step alone), less `left_out` seconds of other work between them; None where the
    run had fewer than three steps."""
    if len(arrivals) < 3:
        return None
    return (arrivals[-1] - arrivals[1] - left_out) / (len(arrivals) - 2)


def count_accepted(verdicts: List[bool]) -> int:
    """How many drafts are kept: those before the first rejection."""
    return verdicts.index(False) if False in verdicts else len(verdicts)


def until_stop(drafts: List[int], stop: Optional[int]) -> List[int]:
    """A step's drafts up to a `stop` token (EOS where it ends the output) and no further: nothing after it is used, so
    nothing after it counts as drafted (the draft model alone stops there; a batch drafts on)."""
    return drafts[: drafts.index(stop) + 1] if stop is not None and stop in drafts else drafts


def step_tokens(drafts, num_accepted, extra, eos, ignore_eos, remaining) -> List[int]:
    """A step's new tokens: the accepted drafts and the main model's own token after them, cut after an EOS (unless
    ignored) and at the `remaining` token budget."""
    tokens = drafts[:num_accepted] + [extra[num_accepted]]
    if not ignore_eos and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens[:remaining]


def tokenize(tokenizer, text: str) -> List[int]:
    """tokenizer(text).input_ids: straight through a fast tokenizer's own backend where transformers would only hand it
    the text (no truncation or padding set on it, special tokens read alike): the same ids in 14-39 us rather than
    60-490 us, where a translation of the demo pair takes 4-9 ms."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and getattr(tokenizer, "is_fast", False)
        and backend.truncation is None
        and backend.padding is None
        and getattr(backend, "encode_special_tokens", False) == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return backend.encode(text).ids
    return tokenizer(text).input_ids


def detokenizer(tokenizer) -> Callable[[List[int]], str]:
    """ids -> tokenizer.decode(ids, skip_special_tokens=True): straight through a fast tokenizer's own backend where
    transformers would only add its clean-up of spaces and it is off (the same text in a sixteenth of the time: the
    decoding loops decode the whole output after every step, for streaming)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and getattr(tokenizer, "is_fast", False)
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
