"""The state of a batch of prompts decoded together: each model's rows, and drafting for every row at once.

Rows come and go: a prompt that finishes leaves the batch (`keep`), and prompts from the queue join it (`add`). Each
row keeps its own prompt length (a cross-attention mask) and its own decoded length (the cache's per-row offsets).
"""

from typing import Callable, List, Optional, Tuple

import mlx.core as mx

import kernels
from drafters import Draft
from sampling import Sampler, one_hot, pad_vocab, position_keys


class Rows:
    """One model's per-row state: cross-attention keys/values of each prompt, its mask, the self-attention cache."""

    def __init__(self, model):
        self.model = model
        self.cross_kv = None  # per layer (keys, values), each (B, heads, S, d_kv); S: the longest prompt
        self.mask = None  # (B, S): 1 where a row's prompt has a token
        self.cache = model.make_cache(0)

    def __len__(self):
        return len(self.cache[0].offsets)

    def add(self, prompts: List[List[int]], encoder_output=None):
        """Append a row for each prompt (token ids), encoded together as one padded batch (or given as
        `encoder_output`, that batch's encoding by an identical encoder); returns the encoder output."""
        width = max(len(prompt) for prompt in prompts)
        pad = self.model.args.pad_token_id
        ids = mx.array([prompt + [pad] * (width - len(prompt)) for prompt in prompts])
        mask = mx.array([[1] * len(prompt) + [0] * (width - len(prompt)) for prompt in prompts])
        if encoder_output is None:
            encoder_output = self.model.encode(ids, mask)
        cross_kv = self.model.cross_kv(encoder_output)
        if self.cross_kv is not None:
            width = max(width, self.mask.shape[1])
            cross_kv = rows_of(self.cross_kv, list(range(len(self))), cross_kv, width)
            mask = mx.concatenate([pad_length(self.mask, width, axis=1), pad_length(mask, width, axis=1)])
        self.cross_kv, self.mask = cross_kv, mask
        # Started, not waited for: the encoding runs behind the step in flight while the host builds the next one
        # (waiting for it made batches 5-12% slower).
        mx.async_eval(self.cross_kv, self.mask)
        for layer_cache in self.cache:
            layer_cache.add_rows(len(prompts))
        return encoder_output

    def keep(self, rows: List[int]):
        """Keep only `rows` (indices), in that order."""
        self.cross_kv = rows_of(self.cross_kv, rows, [], self.mask.shape[1])
        self.mask = self.mask[mx.array(rows, dtype=mx.int32)]
        for layer_cache in self.cache:
            layer_cache.keep_rows(rows)

    def decode(self, ids):
        """Logits (B, L, vocab) for ids (B, L) continuing each row."""
        return self.model.decode(ids, self.cross_kv, self.cache, self.mask)

    def choices(self, ids):
        """The main model's most likely token (B, L) after each of ids (B, L) continuing each row (T5.choices)."""
        return self.model.choices(ids, self.cross_kv, self.cache, self.mask)

    def greedy_draft(self, ids, count):
        """Each row's greedy continuation (B, count) of ids (B, L) as one native operation (T5.greedy_draft's, for
        every row); None where the native layers do not apply."""
        tokens = self.model.greedy_tokens(ids, self.cross_kv, self.cache, self.mask, count)
        return None if tokens is None else tokens.reshape(ids.shape[0], count)

    def rewind(self, lengths: List[int]):
        """Row b keeps at most its first lengths[b] positions."""
        for layer_cache in self.cache:
            layer_cache.trim_rows([max(0, offset - length) for offset, length in zip(layer_cache.offsets, lengths)])


def rows_of(cross_kv, rows, appended, width):
    """Each layer's cross-attention (keys, values) at `rows` (indices, in order), then the rows of `appended` (the same
    for other prompts, or []), all `width` positions wide (zeros past a prompt's own): one native operation where the
    kernels take them, else MLX's gathers, pads and concatenations."""
    arrays = [array for pair in cross_kv for array in pair]
    more = [array for pair in appended for array in pair]
    out = kernels.batch_rows(arrays, rows, more, width)
    if out is None:
        index = None if rows == list(range(arrays[0].shape[0])) else mx.array(rows, dtype=mx.int32)
        out = [pad_length(array if index is None else array[index], width) for array in arrays]
        if more:
            out = [mx.concatenate([kept, pad_length(new, width)]) for kept, new in zip(out, more)]
    return list(zip(out[::2], out[1::2]))


def pad_length(x, width, axis=2):
    """Zeros appended along `axis` up to `width` (cross-attention keys/values: axis 2; masks: axis 1)."""
    missing = width - x.shape[axis]
    if missing == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return mx.pad(x, widths)


def row_keys(keys, count):
    """(B, 2) random keys -> (B, count, 2): each row's key split as mx.random.split splits one."""
    return mx.vmap(lambda key: mx.random.split(key, count))(keys)


class BatchModelDrafter:
    """A draft model drafting for every row in one forward pass per token; each row at its own length."""

    reads_tokens = False  # whether sources() depends on the tokens so far

    def __init__(self, model, sampler: Sampler):
        self.rows = Rows(model)
        self.sampler = sampler

    def add(self, prompts: List[List[int]], encoder_output=None):
        self.rows.add(prompts, encoder_output)

    def keep(self, rows: List[int]):
        self.rows.keep(rows)

    def sources(self, sequences: List[List[int]]) -> List[str]:
        return ["model"] * len(sequences)

    def propose(self, sequences: List[List[int]], counts: List[int], keys) -> Tuple[Draft, List[int], List[str]]:
        """counts[b] tokens after row b's accepted sequence, padded to (B, max(counts)) with q = 0, each row's draft
        length and source; keys: (B, 2), row b's token i drawn with position i's key as a row drafting alone."""
        k = max(counts)
        # Each row's cache holds a prefix of its sequence; feed the rest (one or two tokens), right-padded, and
        # rewind the padding.
        feeds = [sequence[offset:] for sequence, offset in zip(sequences, self.rows.cache[0].offsets)]
        width = max(len(feed) for feed in feeds)
        padded = mx.array([feed + [0] * (width - len(feed)) for feed in feeds])
        # Greedy drafts need only the draft model's choice after each token (T5.choices: no logits where the native
        # layers compute it).
        greedy = self.sampler.greedy
        outputs = self.rows.choices(padded) if greedy else self.rows.decode(padded)
        self.rows.rewind([len(sequence) for sequence in sequences])
        last = mx.array([len(feed) - 1 for feed in feeds])
        if greedy:
            outputs = mx.take_along_axis(outputs, last[:, None], axis=1)[:, 0].astype(mx.int32)
        else:
            outputs = mx.take_along_axis(outputs, last[:, None, None], axis=1)[:, 0]
        if greedy and k > 1:
            # The rest of the greedy drafts, every row's, as one operation where the native layers compute them.
            rest = self.rows.greedy_draft(outputs[:, None], k - 1)
            if rest is not None:
                tokens = mx.concatenate([outputs[:, None], rest], axis=1)
                mx.async_eval(tokens)
                return Draft(tokens, None, "model"), list(counts), ["model" if count else None for count in counts]
        step_keys = None if greedy else mx.vmap(lambda key: position_keys(key, k))(keys)
        tokens, probs = [], []
        for step in range(k):
            if greedy:
                token = self.rows.choices(tokens[-1][:, None])[:, -1].astype(mx.int32) if step else outputs
            else:
                logits = self.rows.decode(tokens[-1][:, None])[:, -1] if step else outputs
                probs.append(self.sampler.distribution(logits))
                token = mx.vmap(self.sampler.sample)(probs[-1], step_keys[:, step]).astype(mx.int32)
            mx.async_eval(token)
            tokens.append(token)
        draft_probs = None
        if probs:
            # A row's tokens past its count are padding: q = 0 there, as RowDrafters pads.
            drafted = mx.arange(k)[None, :] < mx.array(counts)[:, None]
            draft_probs = mx.stack(probs, axis=1) * drafted[..., None]
        draft = Draft(mx.stack(tokens, axis=1), draft_probs, "model")
        return draft, list(counts), ["model" if count else None for count in counts]

    def rewind(self, lengths: List[int]):
        # Row b keeps at most lengths[b] - 1 tokens: its sequence's last token is fed at the next proposal.
        self.rows.rewind([length - 1 for length in lengths])


class RowDrafters:
    """Any single-sequence drafter, one per row: proposals are drawn row by row and padded to one width.

    Row b's draft is `lengths[b]` tokens long; the padding is never accepted (the decoder caps each row's accepted
    count at its length) and, when sampling, carries q = 0, so the main model's token there is drawn from p itself.
    """

    reads_tokens = True  # (a lookup's source comes and goes with the tokens)

    def __init__(self, make_drafter: Callable[[], object], vocab_size: int):
        self.make_drafter = make_drafter
        self.vocab_size = vocab_size
        self.drafters = []

    def add(self, prompts: List[List[int]], encoder_output=None):
        # Each row's drafter encodes its prompt alone, as a single sequence's does (not from the padded batch's
        # encoding, whose numbers may differ in the last bits).
        for prompt in prompts:
            drafter = self.make_drafter()
            drafter.prepare(mx.array([prompt]))
            self.drafters.append(drafter)

    def keep(self, rows: List[int]):
        self.drafters = [self.drafters[row] for row in rows]

    def sources(self, sequences: List[List[int]]) -> List[Optional[str]]:
        """Where each row's next draft would come from (None: nowhere)."""
        return [drafter.source(sequence) for drafter, sequence in zip(self.drafters, sequences)]

    def propose(
        self, sequences: List[List[int]], counts: List[int], keys
    ) -> Tuple[Draft, List[int], List[Optional[str]]]:
        drafts = [
            drafter.propose(sequence, count, key)
            for drafter, sequence, count, key in zip(self.drafters, sequences, counts, keys)
        ]
        width = max(len(draft) for draft in drafts)
        tokens = mx.stack([pad_length(draft.tokens, width, axis=0) for draft in drafts])
        probs = [
            one_hot(draft.tokens, self.vocab_size) if draft.probs is None else pad_vocab(draft.probs, self.vocab_size)
            for draft in drafts
        ]
        draft = Draft(tokens, mx.stack([pad_length(p, width, axis=0) for p in probs]))
        return draft, [len(d) for d in drafts], [d.source if len(d) else None for d in drafts]

    def rewind(self, lengths: List[int]):
        for drafter, length in zip(self.drafters, lengths):
            drafter.rewind(length)
