"""A T5 tokenizer learnt from text: SentencePiece unigram pieces plus T5's sentinel ids, for locally built models."""

import io

import sentencepiece as spm
from transformers import T5Tokenizer


def train_t5_tokenizer(lines, num_pieces, extra_ids=100, model_type="unigram", **options):
    """A T5Tokenizer with `num_pieces` SentencePiece pieces learnt from `lines` and `extra_ids` sentinels.

    The ids follow T5: pad 0, EOS 1, unknown 2, no BOS. `options` go to SentencePieceTrainer.train. With
    `model_type="bpe"` the pieces are BPE's and every piece scores the same, so that the tokenizer (a unigram model,
    as T5's) splits a text into the fewest pieces: BPE's scores are merge ranks, not log probabilities.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=num_pieces,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        **options,
    )
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    if model_type == "bpe":
        vocab = [(piece, 0.0 if i < 3 else -1.0) for i, (piece, _) in enumerate(vocab)]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)
