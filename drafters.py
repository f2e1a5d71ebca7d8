"""Drafters: what proposes the tokens the main model verifies.

A drafter holds the drafting state of one sequence behind four calls: `prepare(prompt_ids, encoder_output)` once per
prompt (encoder_output: the main model's encoding of the prompt where the draft model shares that encoder, else None);
`source(sequence)`, the kind of draft it would propose next ("model", "lookup", or None for none; `reads_tokens` says
whether that depends on the sequence); `propose(sequence, k, key)`, up to k tokens following the accepted `sequence`;
`rewind(length)` once the decoder has settled the sequence's first `length` tokens (anything drafted past them is
forgotten); and `unready(sequence)`, what a draft from the model would compute now before its first token (prompt tokens
to encode, tokens to catch up on), which `--num-draft auto` weighs before trying a length.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from sampling import Sampler, position_keys

MAX_CONTINUATION = 64  # the most tokens a lookup proposes


@dataclass
class Draft:
    tokens: mx.array  # (k,) int32, k <= the number asked for
    probs: Optional[mx.array] = None  # (k, vocab) the distributions they were drawn from; None: deterministic (one-hot)
    source: Optional[str] = "model"  # None for no draft

    def __len__(self):
        return self.tokens.shape[0]


# No tokens, computed once: reading a new empty array would wait for whatever the stream computes before it (a step
# built ahead), which would stop the host building while the device computes.
NO_TOKENS = mx.zeros((0,), dtype=mx.int32)
mx.eval(NO_TOKENS)


def no_draft() -> Draft:
    return Draft(NO_TOKENS, None, None)


class ModelDrafter:
    """A small T5 with the main model's vocabulary, decoding autoregressively with its own cache. `stop`: a token
    after which nothing is worth drafting (EOS where it ends the output); greedy drafts stop computing there."""

    reads_tokens = False  # whether source() depends on the tokens so far

    def __init__(self, model, sampler: Sampler, stop: Optional[int] = None):
        self.model = model
        self.sampler = sampler
        self.stop = stop

    def prepare(self, prompt_ids, encoder_output=None):
        """prompt_ids: (1, L). The prompt is encoded at the first draft, once (or taken as `encoder_output`, the main
        model's encoding, when the draft shares the main model's encoder); its cross-attention keys/values serve every
        step (a run that never drafts, as auto with a draft that does not pay, computes none)."""
        self.prompt_ids, self.encoder_output, self.cross_kv = prompt_ids, encoder_output, None
        self.cache = self.model.make_cache()

    def source(self, sequence: List[int]) -> str:
        return "model"

    def unready(self, sequence: List[int]) -> Tuple[int, int]:
        """(prompt tokens the draft model would encode now, tokens it would feed beyond the newest): work of a step
        beyond drafting, at a prompt's first draft and after plain steps."""
        # (With the main model's encoding of the prompt, encoding it is only the cross-attention projections.)
        encode = self.prompt_ids.shape[1] if self.cross_kv is None else 0
        return encode, max(0, len(sequence) - 1 - self.cache[0].offset)

    def propose(self, sequence: List[int], k: int, key) -> Draft:
        if k == 0:
            return no_draft()
        if self.cross_kv is None:
            encoded = self.model.encode(self.prompt_ids) if self.encoder_output is None else self.encoder_output
            self.cross_kv = self.model.cross_kv(encoded)
        # The cache holds a prefix of the sequence; feed the rest. Greedy drafts are one native operation where the
        # model allows it, computed before the verification is built (which needs them, and is computed at once too);
        # else each token starts computing as soon as its step is built, so building the next step (and the
        # verification) overlaps it, and nothing waits for the drafts.
        draft_input = mx.array([sequence[self.cache[0].offset :]])
        if self.sampler.greedy:
            tokens = self.model.greedy_draft(draft_input, self.cross_kv, self.cache, k, self.stop, now=True)
            if tokens is not None:
                return Draft(tokens, None, "model")
        tokens, probs = [], []
        for step_key in position_keys(key, k):
            logits = self.model.decode(draft_input, self.cross_kv, self.cache)[0, -1]
            if self.sampler.greedy:
                token = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
            else:
                probs.append(self.sampler.distribution(logits))
                token = self.sampler.sample(probs[-1], step_key)[None].astype(mx.int32)
            mx.async_eval(token)
            tokens.append(token)
            draft_input = token.reshape(1, 1)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None, "model")

    def rewind(self, length: int):
        # Keep at most length - 1 tokens: the sequence's last token is fed at the next proposal.
        for layer_cache in self.cache:
            layer_cache.trim(max(0, layer_cache.offset - (length - 1)))


class LookupDrafter:
    """Drafts by copying: the output's last n tokens (n from `max_ngram` down to 1) are looked up in the output so far
    and then in the prompt's token ids, and the tokens that followed the most recent match are proposed (in the output,
    repeated past its end: a loop of a few tokens drafts as far as asked). No model; a proposal is deterministic (q
    one-hot at each token)."""

    reads_tokens = True

    def __init__(self, max_ngram: int = 3, eos_token_id: Optional[int] = None):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.eos_token_id = eos_token_id

    def prepare(self, prompt_ids, encoder_output=None):
        # (The whole array read back, then its row: reading `prompt_ids[0]` evaluates a slice, 40 us.)
        prompt = prompt_ids.tolist()[0]
        # The prompt's closing EOS is the tokenizer's, not text to copy.
        if prompt and prompt[-1] == self.eos_token_id:
            prompt = prompt[:-1]
        self.prompt = prompt
        self.prompt_positions = positions_by_token(prompt)
        self.output_positions = {}
        self.indexed = 0  # output tokens in output_positions
        self.matched = (None, [])  # (what identifies the sequence, continuation) of the last lookup

    def match(self, sequence: List[int]) -> List[int]:
        """What followed the most recent occurrence of the longest suffix of the output found; [] when none."""
        # The sequence only grows between rewinds: its length and last tokens identify it.
        identity = (len(sequence), tuple(sequence[-self.max_ngram :]))
        if self.matched[0] == identity:
            return self.matched[1]
        output = sequence[1:]  # after the decoder start id
        for position in range(self.indexed, len(output)):
            self.output_positions.setdefault(output[position], []).append(position)
        self.indexed = len(output)
        continuation = []
        # Every suffix ends with the last token: where it occurs nowhere else, nothing matches (most steps).
        last = output[-1] if output else None
        if last not in self.prompt_positions and len(self.output_positions.get(last, ())) < 2:
            self.matched = (identity, continuation)
            return continuation
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            suffix = output[-n:]
            # The output (most recent first, not the suffix itself), then the prompt.
            for tokens, positions in ((output, self.output_positions), (self.prompt, self.prompt_positions)):
                for end in reversed(positions.get(suffix[-1], [])):
                    if n - 1 <= end < len(tokens) - 1 and tokens[end - n + 1 : end + 1] == suffix:
                        continuation = tokens[end + 1 : end + 1 + MAX_CONTINUATION]
                        if tokens is output:
                            # The output has repeated itself from end + 1 on, with period len(output) - 1 - end; so
                            # does the draft past its end, as a copy that overlaps what it copies.
                            continuation = (continuation * (MAX_CONTINUATION // len(continuation) + 1))[
                                :MAX_CONTINUATION
                            ]
                        break
                if continuation:
                    break
            if continuation:
                break
        self.matched = (identity, continuation)
        return continuation

    def source(self, sequence: List[int]) -> Optional[str]:
        return "lookup" if self.match(sequence) else None

    def unready(self, sequence: List[int]) -> Tuple[int, int]:
        return 0, 0

    def propose(self, sequence: List[int], k: int, key=None) -> Draft:
        continuation = self.match(sequence)[:k]
        if not continuation:
            return no_draft()
        return Draft(mx.array(continuation, dtype=mx.int32), None, "lookup")

    def rewind(self, length: int):
        output_length = max(0, length - 1)
        if output_length < self.indexed:
            for positions in self.output_positions.values():
                while positions and positions[-1] >= output_length:
                    positions.pop()
            self.indexed = output_length
        self.matched = (None, [])


class HybridDrafter:
    """A lookup match where there is one, else the draft model."""

    reads_tokens = True

    def __init__(self, lookup: LookupDrafter, model_drafter: ModelDrafter):
        self.lookup = lookup
        self.model_drafter = model_drafter

    def prepare(self, prompt_ids, encoder_output=None):
        self.lookup.prepare(prompt_ids)
        self.model_drafter.prepare(prompt_ids, encoder_output)

    def source(self, sequence: List[int]) -> str:
        return self.lookup.source(sequence) or "model"

    def unready(self, sequence: List[int]) -> Tuple[int, int]:
        return self.model_drafter.unready(sequence)

    def propose(self, sequence: List[int], k: int, key) -> Draft:
        drafter = self.lookup if self.lookup.match(sequence) else self.model_drafter
        return drafter.propose(sequence, k, key)

    def rewind(self, length: int):
        self.lookup.rewind(length)
        self.model_drafter.rewind(length)


def positions_by_token(tokens: List[int]) -> Dict[int, List[int]]:
    """token -> the positions where it occurs, in order."""
    positions = {}
    for position, token in enumerate(tokens):
        positions.setdefault(token, []).append(position)
    return positions
