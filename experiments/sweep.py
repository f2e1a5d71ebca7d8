"""What a sweep runs and measures: its settings (a base, and each axis varied alone around it), the rounds that run
them, each setting's speed and acceptance, and the check that δ = 0 greedy decoding is the main model's own output."""

import statistics
from dataclasses import asdict, dataclass, replace
from typing import Union

from tqdm import tqdm

from decoder import DRAFTERS, MAX_NUM_DRAFT, SpeculativeDecoder


class IdentityError(AssertionError):
    """Speculative decoding at delta 0, greedy, did not reproduce the main model's greedy output."""


@dataclass(frozen=True)
class Setting:
    """One run: how to decode (num_draft 0 is regular decoding; "auto" chooses per step) and which prompts
    (prompt_tokens 0: whole)."""

    temperature: float
    prompt_tokens: int
    max_tokens: int
    num_draft: Union[int, str]
    delta: float
    drafter: str = "model"

    def baseline(self):
        """Regular decoding of the same prompts, length and temperature: the denominator of the speedup."""
        return replace(self, num_draft=0, delta=0.0, drafter="model")

    def reference(self):
        """The main model's greedy output of the same prompts and length: what quality is measured against."""
        return replace(self, num_draft=0, delta=0.0, temperature=0.0, drafter="model")

    def order(self):
        """Sort key: fixed draft lengths before auto."""
        auto = self.num_draft == "auto"
        return (
            self.temperature,
            self.prompt_tokens,
            self.max_tokens,
            auto,
            0 if auto else self.num_draft,
            self.delta,
            DRAFTERS.index(self.drafter),
        )

    def __str__(self):
        decoding = f"k={self.num_draft} {self.drafter} δ={self.delta:g}" if self.num_draft else "regular"
        return f"{decoding} T={self.temperature:g} prompt={self.prompt_tokens or 'whole'} max={self.max_tokens}"


def sweep(args):
    """Every Setting to run: the base, each axis varied alone around it, and the regular runs they are compared to."""
    base = Setting(
        temperature=0.0, prompt_tokens=0, max_tokens=args.base_max_tokens, num_draft=args.base_num_draft, delta=0.0
    )
    axes = dict(
        num_draft=args.num_draft,
        drafter=args.drafter,
        delta=args.delta,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    settings = {base} | {replace(base, **{axis: value}) for axis, values in axes.items() for value in values}
    # Regular decoding has no delta.
    settings = {setting if setting.num_draft else setting.baseline() for setting in settings}
    settings |= {setting.baseline() for setting in settings} | {setting.reference() for setting in settings}
    return base, sorted(settings, key=Setting.order)


def decode(pair, setting, prompts, seed, ignore_eos, warm_up, max_num_draft=MAX_NUM_DRAFT):
    """The generation of each prompt under `setting`, timed; after one untimed run of the first when `warm_up`."""
    model, draft_model, tokenizer = pair
    decoder = SpeculativeDecoder(
        model,
        draft_model,
        tokenizer,
        num_draft=setting.num_draft or 1,
        drafter=setting.drafter,
        max_num_draft=max_num_draft,
        delta=setting.delta,
        temperature=setting.temperature,
        seed=seed,
    )
    options = dict(max_tokens=setting.max_tokens, regular=setting.num_draft == 0, ignore_eos=ignore_eos)
    if warm_up:
        decoder.generate(prompts[0], **options)
    return [decoder.generate(prompt, **options) for prompt in prompts]


def sweep_rounds(pair, settings, prompt_sets, args):
    """{setting: generations}: every setting run `args.repeats` times, the fastest run of each prompt kept.

    Each round runs every setting once, so that a slow spell of the machine falls on all settings alike.
    """
    generations = {}
    progress = tqdm(total=len(settings) * args.repeats, desc="runs", unit="run")
    for repeat in range(args.repeats):
        for setting in settings:
            progress.set_postfix_str(f"round {repeat + 1}: {setting}")
            prompts = prompt_sets[setting.prompt_tokens]
            runs = decode(pair, setting, prompts, args.seed, args.ignore_eos, repeat == 0, args.max_num_draft)
            both = zip(generations.get(setting, runs), runs)
            generations[setting] = [min(candidates, key=lambda g: g.stats.seconds) for candidates in both]
            progress.update()
    progress.close()
    return generations


def speed(setting, generations, prompt_lengths):
    """A CSV row's speed and acceptance columns, from one run's generations."""
    stats = [generation.stats for generation in generations]

    def total(name):
        return sum(getattr(s, name) for s in stats)

    generated, seconds, speculative = total("generated"), total("seconds"), setting.num_draft != 0
    return dict(
        asdict(setting),
        prompts=len(generations),
        prompt_length=statistics.mean(prompt_lengths),
        generated=generated,
        seconds=seconds,
        tokens_per_second=generated / seconds,
        main_calls=total("main_calls"),
        drafted=total("drafted"),
        accepted=total("accepted"),
        # Acceptance means nothing without a draft.
        acceptance_rate=total("accepted") / total("drafted") if speculative and total("drafted") else None,
        mean_accepted=total("accepted") / total("main_calls") if speculative else None,
        mean_num_draft=total("drafted") / total("main_calls") if speculative else None,
        lookup_share=total("lookup_drafted") / total("drafted") if speculative and total("drafted") else None,
    )


def check_identity(settings, generations, rows):
    """Raise IdentityError unless every speculative run at delta 0, greedy, equals the main model's greedy output."""
    perfect = dict(token_match=1.0, rouge_l=1.0, cosine=1.0, bleu=100.0)
    problems = []
    for setting in settings:
        if setting.num_draft == 0 or setting.delta or setting.temperature:
            continue
        reference = generations[setting.reference()]
        differing = [i for i, (r, o) in enumerate(zip(reference, generations[setting])) if r.tokens != o.tokens]
        if differing:
            problems.append(f"{setting}: prompts {differing} differ from regular greedy decoding")
        for name, value in perfect.items():
            if rows[setting][name] not in (None, value):
                problems.append(f"{setting}: {name} is {rows[setting][name]}, not {value}")
    if problems:
        raise IdentityError(
            "speculative decoding at δ = 0, greedy, is not the main model's output: " + "; ".join(problems)
        )
