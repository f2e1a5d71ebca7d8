"""The decoder's self-attention cache, outside the model's parameters: one per decoder layer (T5.make_cache)."""

import mlx.core as mx


class KVCache:
    """Self-attention keys/values of a batch of rows, preallocated in steps.

    Each row has its own length (`offsets`): new keys and values go to each row's own next positions, and rewinding
    a row (`trim`, `trim_rows`) only lowers its length, in O(1). A row's positions past its length hold stale entries
    that the decoder's causal bias masks out. A cache made for one row takes the batch size of its first update.
    """

    # The first capacity is a multiple of `step` positions; a full cache grows to at least twice its capacity (each
    # growth copies what is in use, so a long output copies each position about twice at most). A short first
    # capacity: a new cache is zeroed, and every step of the native layers writes its caches into new buffers of the
    # capacity's size. On the demo pair (outputs of about 16 tokens) 32 positions instead of 256 made the default
    # speculative decoding 11-17% faster and regular decoding 3-4% (interleaved per prompt, two runs).
    step = 32
    # ... but no more positions than take `step_bytes` per layer: a t5-11b-shaped layer holds 128 heads of 128 floats
    # per position and key (131 KB a position with values), so its 24 layers' first 32 positions took 100 MB beside a
    # 510-token prompt's 1.6 GB of cross-attention keys and values; 8 positions take a quarter of that.
    step_bytes = 1 << 20

    # Whether the native layers write a step's new positions into the buffers themselves rather than into copies: the
    # buffers are this cache's own, so an array read from `keys` or `values` keeps each row's positions below its length
    # then, and those past it change with the steps that follow (a trim gives positions back to be written again).
    # Copying every cache at every step cost a batch of 8 rows of the demo pair about a tenth of its step.
    in_place = True

    def __init__(self, batch_size: int = 1):
        self.keys = None
        self.values = None
        self.offsets = [0] * batch_size
        # Row b's keys and values are row rows[b] of the buffers (-1: a row that joined, empty), or row b where None.
        # Rows leaving or joining a batch change only this: the native layers read the buffers through it as they copy
        # them (each of their steps writes the caches anew), and anything else gathers them first (gather_rows).
        self.rows = None

    @property
    def offset(self) -> int:
        """Positions in use: the longest row's length."""
        return max(self.offsets)

    def update_and_fetch(self, keys, values):
        # keys, values: (B, heads, L, d_kv), row b written at positions offsets[b] .. offsets[b] + L - 1
        self.reserve(keys.shape, keys.dtype)
        end = self.offset + keys.shape[2]
        self.write(keys, values)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reserve(self, shape, dtype, mapped: bool = False):
        """Room for `shape` (B, heads, L, d_kv) new keys and values past every row's length; returns the buffers
        (B, heads, capacity, d_kv), whose positions below each row's length are its keys and values. `mapped`: the
        caller reads row b of them at row self.rows[b] (where not None), so they may keep other rows."""
        batch, length = shape[0], shape[2]
        if len(self.offsets) != batch and self.keys is None and self.offsets == [0]:
            self.offsets = [0] * batch
        end = self.offset + length
        if not mapped or (self.keys is not None and end > self.keys.shape[2]):
            self.gather_rows()
        if self.keys is None or end > self.keys.shape[2]:
            position_bytes = 2 * shape[0] * shape[1] * shape[3] * dtype.size
            step = min(self.step, max(1, self.step_bytes // position_bytes))
            capacity = ((end + step - 1) // step) * step
            if self.keys is not None:
                capacity = max(capacity, 2 * self.keys.shape[2])
            shape = (*shape[:2], capacity, shape[3])
            new_keys, new_values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
            if self.keys is not None:
                new_keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
                new_values[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = new_keys, new_values
        return self.keys, self.values

    def write(self, keys, values):
        """Write keys and values (B, heads, L, d_kv) at each row's next positions (reserved) and advance them."""
        starts, length = self.offsets, keys.shape[2]
        if len(set(starts)) == 1:
            self.keys[:, :, starts[0] : starts[0] + length] = keys
            self.values[:, :, starts[0] : starts[0] + length] = values
        else:
            # (B, 1, L, 1): each row's own positions
            positions = (mx.array(starts)[:, None] + mx.arange(length))[:, None, :, None]
            self.keys = mx.put_along_axis(self.keys, positions, keys, axis=2)
            self.values = mx.put_along_axis(self.values, positions, values, axis=2)
        self.offsets = [start + length for start in starts]

    def replace(self, keys, values, length: int):
        """Take buffers of the rows in order (as `reserve` returned them, or their copy by the native layers) with
        `length` new positions written past every row's length."""
        self.keys, self.values, self.rows = keys, values, None
        self.offsets = [offset + length for offset in self.offsets]

    def trim(self, n: int) -> int:
        """Rewind every row by n positions (at most its length); returns the most any row was rewound."""
        return max(self.trim_rows([n] * len(self.offsets)))

    def trim_rows(self, counts) -> list:
        """Rewind row b by counts[b] positions (at most its length); returns how far each row was rewound."""
        trimmed = [min(offset, n) for offset, n in zip(self.offsets, counts)]
        self.offsets = [offset - n for offset, n in zip(self.offsets, trimmed)]
        return trimmed

    def keep_rows(self, rows) -> None:
        """Drop every row not in `rows` (indices, in the order to keep)."""
        if self.keys is not None and rows:
            self.rows = [self.buffer_row(row) for row in rows]
        elif self.keys is not None:
            self.keys = self.values = self.rows = None
        self.offsets = [self.offsets[row] for row in rows]

    def add_rows(self, count: int) -> None:
        """Append `count` empty rows."""
        if self.keys is not None:
            self.rows = [self.buffer_row(row) for row in range(len(self.offsets))] + [-1] * count
        self.offsets = self.offsets + [0] * count

    def buffer_row(self, row: int) -> int:
        return row if self.rows is None else self.rows[row]

    def gather_rows(self) -> None:
        """Make row b of the buffers row b's own (rows that joined: zeros)."""
        if self.rows is None:
            return
        if self.rows != list(range(self.keys.shape[0])):
            index = mx.array([max(row, 0) for row in self.rows])
            kept = mx.array([row >= 0 for row in self.rows])[:, None, None, None]
            self.keys = mx.where(kept, self.keys[index], 0)
            self.values = mx.where(kept, self.values[index], 0)
        self.rows = None
