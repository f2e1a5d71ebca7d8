"""The sweep's prompts: held-out code prompts for the demo pair, prompt files, and truncation to a length."""

import json
import re

# Held-out Python standard library code (files the demo pair never trained on), in the demo's task format:
# `complete:` and 64 tokens of code with newlines and indentation flattened to spaces.
DEFAULT_PROMPTS = [
    "complete: def _deepcopy_dict(x, memo, deepcopy=deepcopy): y = {} memo[id(x)] = y for key, value in "
    "x.items(): y[deepcopy(key, memo)] = deepcopy(value, memo) return y d[dict] = _deepcopy_dict",
    "complete: def glob0(dirname, pattern): return _glob0(dirname, pattern, None, False) def glob1(dirname, "
    "pattern): return _glob1(dirname, pattern, None, False) # This helper function recursively yields "
    "relative pathnames inside a literal # directory. def",
    'complete: def digest(self): """Return the hash value of this hashing object. This returns the hmac value '
    "as bytes. The object is not altered in any way by this function; you can continue updating the object "
    'after calling this function. """ h = self._current() return h.digest',
    'complete: def choice(self, seq): """Choose a random element from a non-empty sequence.""" # As an '
    'accommodation for NumPy, we don\'t use "if not seq" # because bool(numpy.array()) raises a ValueError.',
    'complete: def cancel(self, event): """Remove an event from the queue. This must be presented the ID as '
    'returned by enter(). If the event is not in the queue, this raises ValueError. """ with self._lock: '
    "self._queue.remove(event) heapq.heapify",
    'complete: def copyfileobj(fsrc, fdst, length=0): """copy data from file-like object fsrc to file-like '
    'object fdst""" if not length: length = COPY_BUFSIZE # Localize variable access to minimize overhead. '
    "fsrc_read = fsrc",
    'complete: def _sanitize_params(prefix, suffix, dir): """Common parameter processing for most APIs in '
    'this module.""" output_type = _infer_return_type(prefix, suffix, dir) if suffix is None: suffix = '
    "output_type() if prefix is None",
    'complete: def strclass(cls): return "%s.%s" % (cls.__module__, cls.__qualname__) def '
    'sorted_list_difference(expected, actual): """Finds elements in only one or the other of two, sorted '
    "input lists. Returns a two-element tuple of lists",
    'complete: def iselement(element): """Return True if *element* appears to be an Element.""" return '
    'hasattr(element, \'tag\') class Element: """An XML element. This class is the reference implementation of '
    "the Element interface. An element's length is its number of subelements. That",
    'complete: def __getattr__(name): if name == "TZPATH": return _tzpath.TZPATH else: raise '
    'AttributeError(f"module {__name__!r} has no attribute {name!r}") def __dir__(): return '
    'sorted(list(globals()) + ["TZPATH',
    'complete: def send_error(self, code, message=None, explain=None): """Send and log an error reply. '
    "Arguments are * code: an HTTP error code 3 digits * message: a simple optional 1 line reason phrase. *( "
    "HTAB / SP / VCHAR",
    "complete: def makepath(*paths): dir = os.path.join(*paths) try: dir = os.path.abspath(dir) except "
    'OSError: pass return dir, os.path.normcase(dir) def abs_paths(): """Set all module __file__ and __cached',
    'complete: def get_children(self): """Return a list of the nested symbol tables. """ return '
    "[_newSymbolTable(st, self._filename) for st in self._table.children] class Function(SymbolTable): # "
    "Default values",
    "complete: def find_module(self, name, path, parent=None): if parent is not None: # assert path is not "
    "None fullname = parent.__name__+'.'+name else: fullname = name if fullname in self.excludes: "
    'self.msgout(3, "find_module',
]

# A T5 task prefix: up to five words and a colon ("complete:", "translate English to German:").
TASK_PREFIX = re.compile(r"((?:[\w-]+ ){0,4}[\w-]+:)\s+(.*)", re.S)


class PromptFileError(Exception):
    """A prompt file that cannot be read or holds no usable prompt."""


def read_prompts(path):
    """Prompts from a text file (one per line) or JSON Lines (a string or an object with "prompt" per line).

    Raises PromptFileError when the file cannot be read or a line holds no prompt.
    """
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read the prompt file {path} ({e})") from e
    if path.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for line in lines):
        prompts = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except ValueError as e:
                raise PromptFileError(f"{path}:{number} is not valid JSON ({e})") from e
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptFileError(
                    f'{path}:{number} has no prompt: give a string or an object with a non-empty "prompt" field'
                )
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"the prompt file {path} has no prompts")
    return prompts


def truncate(prompt, tokens, tokenizer):
    """`prompt` with its task prefix kept and at most the last `tokens` tokens of the rest; 0 keeps it whole."""
    match = TASK_PREFIX.fullmatch(prompt)
    prefix, body = (match[1] + " ", match[2]) if match else ("", prompt)
    ids = tokenizer(body, add_special_tokens=False).input_ids
    if not tokens or len(ids) <= tokens:
        return prompt
    # The end of the text is kept: it is what a continuation follows on from. It starts at a word (a SentencePiece
    # piece with "▁"), so that it tokenizes back to at most `tokens` tokens.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    start = next((i for i in range(len(ids) - tokens, len(ids)) if pieces[i].startswith("▁")), len(ids) - tokens)
    return prefix + tokenizer.decode(ids[start:])
