"""Train the bundled demo pair: a main T5 that translates English to German and a much smaller draft T5 distilled
from it. The data comes from tools/demo_data.py's grammar, so this runs offline anywhere:

    python -m tools.train_demo_pair            # writes models/demo/{main,draft} and models/demo/prompts.txt

The main model learns from the data; the draft starts from the main model's embeddings, encoder and first decoder
layer, keeps the embeddings and the encoder as they are (so that decoding encodes each prompt once, for both), and its
decoder is then distilled from the main model: at every target position of the same sentences, teacher-forced, it
learns the main model's whole next-token distribution (KL divergence), which is what makes it agree with the main
model's greedy choices. Sentences whose English hashes into the held-out set are never trained on; the held-out exact
match of both models' greedy translations, and how often the draft's greedy choice is the main model's, are printed at
the end. The run is seeded: the same torch and thread count give the same weights.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import Adafactor, AutoTokenizer, T5Config, T5ForConditionalGeneration

from tools.demo_data import sample
from tools.t5_tokenizer import train_t5_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
EXTRA_IDS = 100  # T5's sentinel tokens, as in every T5 vocabulary
VOCAB_SIZE = 1024  # SentencePiece pieces + sentinels: a multiple of 128
TOKENIZER_SENTENCES = 100_000
NUM_PROMPTS = 100  # held-out prompts shipped in models/demo/prompts.txt
NUM_EVAL = 300  # held-out sentences the models are scored on

# Both are T5 v1.0 (relu, tied embeddings), like the t5-small / t5-11b pair they stand in for.
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    dropout_rate=0.0,  # every batch is new sentences: nothing to regularise
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
# The decoder is what runs once per token: the main model's is deep (8 layers), the draft's one narrower layer, so that
# a draft step costs a small share of a main step. The encoders run once per prompt.
MODELS = {
    "main": dict(d_model=192, d_ff=768, d_kv=48, num_heads=4, num_layers=3, num_decoder_layers=8),
    "draft": dict(d_model=192, d_ff=768, d_kv=48, num_heads=4, num_layers=3, num_decoder_layers=1),
}
# T5's own optimizer: each step is relative to the scale of the weight it updates.
LEARNING_RATE = 1e-2
MAIN_STEPS = 5000
DRAFT_STEPS = 2500
BATCH_SIZE = 48
WARMUP = 100


class Sentences:
    """An endless stream of training batches: sentences drawn from the grammar, held-out ones left out."""

    def __init__(self, tokenizer, seed):
        self.tokenizer, self.seed = tokenizer, seed

    def batch(self, step):
        """(input ids, attention mask, labels) of the `step`-th batch: the same for every model trained."""
        return encode(self.tokenizer, sample(BATCH_SIZE, self.seed * 1_000_003 + step, split="train"))


def encode(tokenizer, examples):
    inputs = tokenizer([e["prompt"] for e in examples], padding=True, return_tensors="pt")
    labels = tokenizer([e["reference"] for e in examples], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return inputs.input_ids, inputs.attention_mask, labels


def schedule(step, steps):
    """The factor on the peak learning rate: linear warmup, then cosine decay to a tenth."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def distillation_loss(logits, teacher_logits, labels):
    """KL(teacher || student) per target position, averaged over the real (not padded) positions."""
    log_student, log_teacher = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    mask = labels != -100
    return per_position[mask].mean()


def train(name, data, steps, teacher=None):
    """Train the `name` model (main or draft) from scratch, on the data or, given a `teacher`, distilled from it
    (teacher-forced on the same sentences); returns it in eval mode."""
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(T5Config(**COMMON, **MODELS[name]))
    if teacher is not None:
        # The draft starts from what it shares with the main model (same width): the embeddings, the encoder, the
        # first decoder layer (with the position bias) and the final norm; distillation then fits its one layer.
        own = model.state_dict()
        shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        print(f"  {len(shared)} of {len(own)} tensors start from the main model's", flush=True)
        # The embeddings and the encoder stay the main model's: the decoder then reuses the main model's encoder
        # output for the draft (one encoder per prompt, not two), and only the draft's decoder learns.
        for key, parameter in model.named_parameters():
            if key.startswith(("shared.", "encoder.")):
                parameter.requires_grad_(False)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = Adafactor(trained, lr=LEARNING_RATE, scale_parameter=True, relative_step=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, steps))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.2f}M parameters, {steps} steps of {BATCH_SIZE} sentences", flush=True)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        inputs, mask, labels = data.batch(step)
        if teacher is None:
            loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs, attention_mask=mask, labels=labels).logits
            logits = model(input_ids=inputs, attention_mask=mask, labels=labels).logits
            loss = distillation_loss(logits, teacher_logits, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            mean = sum(losses[-50:]) / len(losses[-50:])
            what = "training loss" if teacher is None else "KL to the main model"
            print(f"  step {step:5d}  {what} {mean:.4f}  {time.perf_counter() - start:5.0f} s", flush=True)
    # Evaluate (and ship) the weights as they are stored: rounded to bfloat16.
    return model.to(torch.bfloat16).float().eval()


@torch.no_grad()
def greedy(model, tokenizer, prompts, max_tokens=64):
    """Greedy translations of `prompts`, batched, without a cache (the decoder is re-run on the whole prefix)."""
    texts = []
    for start in range(0, len(prompts), 50):
        inputs = tokenizer(prompts[start : start + 50], padding=True, return_tensors="pt")
        encoder_outputs = model.get_encoder()(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        ids = torch.zeros((len(inputs.input_ids), 1), dtype=torch.long)
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(max_tokens):
            logits = model(
                encoder_outputs=encoder_outputs, attention_mask=inputs.attention_mask, decoder_input_ids=ids
            ).logits
            token = logits[:, -1].argmax(-1).masked_fill(done, tokenizer.pad_token_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == tokenizer.eos_token_id
            if done.all():
                break
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts


@torch.no_grad()
def agreement(model, teacher, tokenizer, examples):
    """How often `model`'s greedy next token is `teacher`'s, teacher-forced on the references."""
    inputs, mask, labels = encode(tokenizer, examples)
    ours = model(input_ids=inputs, attention_mask=mask, labels=labels).logits.argmax(-1)
    theirs = teacher(input_ids=inputs, attention_mask=mask, labels=labels).logits.argmax(-1)
    real = labels != -100
    return (ours == theirs)[real].float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "demo", help="Output directory")
    parser.add_argument("--main-steps", type=int, default=MAIN_STEPS, help="Training steps of the main model")
    parser.add_argument("--draft-steps", type=int, default=DRAFT_STEPS, help="Distillation steps of the draft")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    parser.add_argument(
        "--draft-only",
        action="store_true",
        help="Keep the main model in --out (from an earlier run) and distill only the draft from it",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    corpus = sample(TOKENIZER_SENTENCES // 2, seed=SEED, split="train")
    lines = [e["prompt"] for e in corpus] + [e["reference"] for e in corpus]
    tokenizer = train_t5_tokenizer(
        lines,
        VOCAB_SIZE - EXTRA_IDS,
        EXTRA_IDS,
        model_type="bpe",  # (unigram training split even the prefix into letters at this vocabulary size)
        character_coverage=1.0,  # every German letter
        split_digits=True,  # numbers are copied digit by digit
        normalization_rule_name="identity",  # the HF tokenizer does not normalise either
        num_threads=1,  # deterministic
    )
    held_out = sample(NUM_EVAL + NUM_PROMPTS, seed=SEED + 7, split="test")
    prompts, evaluation = held_out[:NUM_PROMPTS], held_out[NUM_PROMPTS:]
    print(f"tokenizer trained in {time.perf_counter() - start:.0f} s on {len(lines)} lines", flush=True)
    for example in prompts:  # the text round-trips through the tokenizer
        assert (
            tokenizer.decode(tokenizer(example["reference"]).input_ids, skip_special_tokens=True)
            == example["reference"]
        ), example

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "prompts.txt", "w") as file:
        file.writelines(json.dumps(example, ensure_ascii=False) + "\n" for example in prompts)
    data, results, teacher = Sentences(tokenizer, SEED + 1), {}, None
    for name in MODELS:  # the main model first: the draft is distilled from it
        tick = time.perf_counter()
        if name == "main" and args.draft_only:
            model = T5ForConditionalGeneration.from_pretrained(args.out / name, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.out / name)
            data = Sentences(tokenizer, SEED + 1)
        else:
            model = train(name, data, getattr(args, f"{name}_steps"), teacher)
        minutes = (time.perf_counter() - tick) / 60
        outputs = greedy(model, tokenizer, [e["prompt"] for e in evaluation])
        exact = sum(o == e["reference"] for o, e in zip(outputs, evaluation)) / len(evaluation)
        agrees = None if teacher is None else agreement(model, teacher, tokenizer, evaluation)
        results[name] = (exact, agrees, minutes)
        if not (name == "main" and args.draft_only):
            model.to(torch.bfloat16).save_pretrained(args.out / name)
            tokenizer.save_pretrained(args.out / name)
        teacher = model.float()  # as shipped: its weights were rounded to bfloat16
        misses = [(o, e["reference"]) for o, e in zip(outputs, evaluation) if o != e["reference"]]
        for output, reference in misses[:5]:
            print(f"  {name} wrote {output!r}, reference {reference!r}")

    print(f"held out: {len(evaluation)} sentences never trained on")
    for name, (exact, agrees, minutes) in results.items():
        agrees = "" if agrees is None else f"  greedy choice the main model's {agrees:.1%}"
        print(f"{name:5s}  exact match {exact:.1%}{agrees}  trained in {minutes:.1f} min")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
