"""Whether a run fits in the memory left: how long a prompt may be, and how many prompts may be decoded at a time,
from what the models say they need (T5.memory_needed)."""

from pathlib import Path


def available_memory():
    """Bytes of memory this process can still take: the kernel's MemAvailable, or what is left under a cgroup's limit
    where that is less; None where neither can be read (not Linux)."""
    amounts = []
    try:
        with open("/proc/meminfo") as f:
            amounts += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            amounts.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(amounts) if amounts else None


def memory_needed(models, length, batch_size, max_tokens):
    return sum(model.memory_needed(length, batch_size, max_tokens) for model in models)


def longest_fitting(models, batch_size, max_tokens, available):
    """The most tokens each of `batch_size` prompts may have for them to fit in `available` bytes (0: none fits)."""
    low, high = 0, 1
    while memory_needed(models, high, batch_size, max_tokens) <= available and high < 1 << 40:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        fits = memory_needed(models, middle, batch_size, max_tokens) <= available
        low, high = (middle, high) if fits else (low, middle)
    return low


def too_long(models, length, max_tokens, available):
    """Why a prompt of `length` tokens cannot be decoded in `available` bytes of memory; None when it can."""
    need = memory_needed(models, length, 1, max_tokens)
    if available is None or need <= available:
        return None
    longest = longest_fitting(models, 1, max_tokens, available)
    if not longest:
        return (
            f"decoding {max_tokens} tokens needs more than the {max(available, 0) / 2**30:.1f} GiB of memory "
            "available, whatever the prompt; lower --max-tokens, or free memory"
        )
    return (
        f"the prompt has {length} tokens, which need about {need / 2**30:.1f} GiB of memory to encode and decode; "
        f"{max(available, 0) / 2**30:.1f} GiB is available, enough for prompts of up to {longest} tokens; shorten "
        "the prompt, or free memory"
    )


def fitting_batch_size(models, lengths, batch_size, max_tokens, available):
    """`batch_size`, or fewer where that many of the longest prompt would not fit in `available` bytes."""
    longest = max(lengths, default=1)
    while batch_size > 1 and available is not None:
        if memory_needed(models, longest, batch_size, max_tokens) <= available:
            break
        batch_size -= 1
    return batch_size
