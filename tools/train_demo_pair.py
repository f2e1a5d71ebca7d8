"""Train the bundled demo pair: a main T5 and a much smaller draft T5 that continue Python code.

Everything comes from the Python standard library's own source code, so this runs offline anywhere:

    python tools/train_demo_pair.py            # ~67 minutes on a busy 2-core machine; writes models/demo/{main,draft}

The task is code continuation: `complete: <64 tokens of code>` -> the next 64 tokens, then EOS. T5's
SentencePiece tokenizer splits on whitespace, so the code is read and written without newlines or indentation.
The main model learns from the data; the draft is then distilled from it: at every target position of the same
training windows, teacher-forced, it learns the main model's whole next-token distribution (KL divergence), which is
what makes it agree with the main model's greedy choices. Whole files are held out (by a hash of their path); the
held-out loss and token accuracy of both models, and how often the draft's greedy choice is the main model's, are
printed at the end. The run is seeded: the same Python (its standard library is the data), torch and thread
count give the same weights.
"""

import argparse
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from t5_tokenizer import train_t5_tokenizer
from transformers import Adafactor, T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
PREFIX = "complete:"
CONTEXT = 64  # prompt tokens after the prefix
TARGET = 64  # tokens to continue with, then EOS
EXTRA_IDS = 100  # T5's sentinel tokens, as in every T5 vocabulary
VOCAB_SIZE = 4096  # SentencePiece pieces + sentinels: a multiple of 128
# Test suites, generated tables, prose and installed packages are not the code we want to continue.
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "pydoc_data", "site-packages"}
HELD_OUT_EVERY = 10  # one file in ten, by a hash of its path
NUM_PROMPTS = 20
NUM_EVAL = 512

# Both are T5 v1.0 (relu, tied embeddings), like the t5-small / t5-11b pair they stand in for.
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    dropout_rate=0.0,  # under two epochs of data: nothing to regularise
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
# The decoder is what runs once per token: the main model's is deep (8 layers), the draft's one narrower layer, so that
# a draft step costs a small share of a main step. The encoders run once per prompt; the main model's is kept shallow,
# which saves training time.
MODELS = {
    "main": dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=2, num_decoder_layers=8),
    "draft": dict(d_model=192, d_ff=768, d_kv=48, num_heads=4, num_layers=2, num_decoder_layers=1),
}
# T5's own optimizer: each step is relative to the scale of the weight it updates. (With AdamW, T5's unit-scale
# embeddings, which are also the output layer, barely move in a run this short.)
LEARNING_RATE = 1e-2
MAIN_STEPS = 720
DRAFT_STEPS = 600
BATCH_SIZE = 16
WARMUP = 100


def source_files():
    """The standard library's .py files -> (training, held out): sorted lists of (relative path, text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).as_posix()
        if SKIPPED_DIRS & set(path.relative_to(stdlib).parts):
            continue
        split = held_out if zlib.crc32(relative.encode()) % HELD_OUT_EVERY == 0 else train
        split.append((relative, path.read_text(encoding="utf-8", errors="replace")))
    return train, held_out


def train_tokenizer(files):
    """A T5Tokenizer whose SentencePiece unigram pieces are learnt from the lines of `files`."""
    lines = [line.strip() for _, text in files for line in text.splitlines() if line.strip()]
    return train_t5_tokenizer(
        lines,
        VOCAB_SIZE - EXTRA_IDS,
        EXTRA_IDS,
        character_coverage=0.9999,
        normalization_rule_name="identity",  # the HF tokenizer does not normalise either
        num_threads=1,  # deterministic
    )


class Windows:
    """Every (context, target) window of a set of files that starts at the start of a word."""

    def __init__(self, files, tokenizer):
        ids = tokenizer([text for _, text in files], add_special_tokens=False).input_ids
        word_start = np.array(
            [piece.startswith("▁") for piece in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))]
        )
        self.tokens = torch.tensor(np.concatenate(ids), dtype=torch.long)
        starts, offset = [], 0
        for file_ids in ids:
            positions = np.arange(max(0, len(file_ids) - CONTEXT - TARGET + 1))
            starts.append(offset + positions[word_start[np.array(file_ids, dtype=np.int64)[positions]]])
            offset += len(file_ids)
        self.starts = torch.tensor(np.concatenate(starts), dtype=torch.long)
        self.file_of = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(s) for s in starts]))
        prefix = tokenizer(PREFIX, add_special_tokens=False).input_ids
        self.prefix = torch.tensor(prefix, dtype=torch.long)
        self.eos = tokenizer.eos_token_id

    def batch(self, indices):
        """(input ids, labels) of the windows at `indices`: `complete: <context></s>` -> `<target></s>`."""
        span = self.starts[indices, None] + torch.arange(CONTEXT + TARGET)
        windows = self.tokens[span]
        rows = len(indices)
        eos = torch.full((rows, 1), self.eos)
        inputs = torch.cat([self.prefix.expand(rows, -1), windows[:, :CONTEXT], eos], dim=1)
        return inputs, torch.cat([windows[:, CONTEXT:], eos], dim=1)


def schedule(step, steps):
    """The factor on the peak learning rate: linear warmup, then cosine decay to a tenth."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def distillation_loss(logits, teacher_logits):
    """KL(teacher || student) per target position, averaged: the student learns the teacher's whole distribution."""
    log_student, log_teacher = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()


def train(name, windows, steps, teacher=None):
    """Train the `name` model (main or draft) from scratch, on the data or, given a `teacher`, distilled from it
    (teacher-forced on the same windows); returns it in eval mode."""
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(T5Config(**COMMON, **MODELS[name]))
    generator = torch.Generator().manual_seed(SEED + 1)  # the same batches for both models
    optimizer = Adafactor(model.parameters(), lr=LEARNING_RATE, scale_parameter=True, relative_step=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, steps))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.2f}M parameters, {steps} steps of {BATCH_SIZE} windows")
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        inputs, labels = windows.batch(torch.randint(len(windows.starts), (BATCH_SIZE,), generator=generator))
        if teacher is None:
            loss = model(input_ids=inputs, labels=labels).loss
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs, labels=labels).logits
            loss = distillation_loss(model(input_ids=inputs, labels=labels).logits, teacher_logits)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            mean = sum(losses[-50:]) / len(losses[-50:])
            what = "training loss" if teacher is None else "KL to the main model"
            print(f"  step {step:5d}  {what} {mean:.3f}  {time.perf_counter() - start:5.0f} s", flush=True)
    # Evaluate (and ship) the weights as they are stored: rounded to bfloat16.
    return model.to(torch.bfloat16).float().eval()


@torch.no_grad()
def evaluate(model, windows, indices, reference=None):
    """Mean loss per target token and teacher-forced token accuracy on the windows at `indices`, and how often the
    greedy choice is the `reference` model's (None without one)."""
    total_loss = correct = agreed = count = 0
    for chunk in indices.split(64):
        inputs, labels = windows.batch(chunk)
        logits = model(input_ids=inputs, labels=labels).logits
        total_loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        if reference is not None:
            agreed += (logits.argmax(-1) == reference(input_ids=inputs, labels=labels).logits.argmax(-1)).sum().item()
        count += labels.numel()
    return total_loss / count, correct / count, None if reference is None else agreed / count


def held_out_prompts(windows, tokenizer, generator):
    """NUM_PROMPTS prompts, each from another held-out file, as the text a user would type."""
    files = torch.randperm(int(windows.file_of.max()) + 1, generator=generator)[:NUM_PROMPTS]
    prompts = []
    for file in files.tolist():
        candidates = (windows.file_of == file).nonzero()[:, 0]
        index = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        inputs, _ = windows.batch(index)
        prompt = f"{PREFIX} {tokenizer.decode(inputs[0, len(windows.prefix) : -1])}"
        # The text tokenizes back to the very ids the models were trained on.
        assert tokenizer(prompt).input_ids == inputs[0].tolist(), prompt
        prompts.append(prompt)
    return prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "demo", help="Output directory")
    parser.add_argument("--main-steps", type=int, default=MAIN_STEPS, help="Training steps of the main model")
    parser.add_argument("--draft-steps", type=int, default=DRAFT_STEPS, help="Distillation steps of the draft")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on a busy machine, two threads ran several times slower
    torch.use_deterministic_algorithms(True)

    start = time.perf_counter()
    train_files, held_out_files = source_files()
    tokenizer = train_tokenizer(train_files)
    train_windows, held_out_windows = Windows(train_files, tokenizer), Windows(held_out_files, tokenizer)
    print(
        f"{len(train_files)} training files ({len(train_windows.tokens) / 1e6:.2f}M tokens), "
        f"{len(held_out_files)} held out ({len(held_out_windows.tokens) / 1e6:.2f}M tokens); "
        f"tokenizer trained in {time.perf_counter() - start:.0f} s"
    )

    generator = torch.Generator().manual_seed(SEED)
    eval_indices = torch.randint(len(held_out_windows.starts), (NUM_EVAL,), generator=generator)
    prompts = held_out_prompts(held_out_windows, tokenizer, generator)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    results, teacher = {}, None
    for name in MODELS:  # the main model first: the draft is distilled from it
        tick = time.perf_counter()
        model = train(name, train_windows, getattr(args, f"{name}_steps"), teacher)
        minutes = (time.perf_counter() - tick) / 60
        results[name] = (*evaluate(model, held_out_windows, eval_indices, teacher), minutes)
        model.to(torch.bfloat16).save_pretrained(args.out / name)
        tokenizer.save_pretrained(args.out / name)
        teacher = model.float()  # as shipped: its weights were rounded to bfloat16

    print(f"held-out windows: {NUM_EVAL} from {len(held_out_files)} files never trained on")
    for name, (loss, accuracy, agreement, minutes) in results.items():
        agrees = "" if agreement is None else f"  greedy choice the main model's {agreement:.1%}"
        print(f"{name:5s}  loss {loss:.3f}  token accuracy {accuracy:.1%}{agrees}  trained in {minutes:.1f} min")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
