"""The KV cache of every live sequence on this rank, pooled per layer.

Each layer keeps one keys and one values buffer of shape [rows, kv_heads,
capacity, head_dim]; a sequence owns one row. Pooling lets a decode step
write the new position of every sequence with one scatter and attend for all
of them with one masked attention call, instead of a dozen small operations
per sequence per layer, which on a CPU cost more than the matmuls of a
batched step.

Rows are handed out lowest first, so the rows in use stay packed at the
front. Capacity grows in steps of CAPACITY_STEP positions as sequences
lengthen and is given back when the cache empties. Rolling back rejected
speculative tokens only lowers a length: positions past a sequence's length
are masked and overwritten later.
"""

from __future__ import annotations

import mlx.core as mx

# Positions added at a time when a sequence outgrows the buffers; growing
# copies every layer's buffers, so steps keep that rare.
CAPACITY_STEP = 256
ROWS_STEP = 4


class SlotCache:
    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, dtype: mx.Dtype
    ) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.clear()

    def __contains__(self, slot: int) -> bool:
        return slot in self.row_of

    def clear(self) -> None:
        """Drop every sequence and give the buffers back."""
        self.keys: list[mx.array | None] = [None] * self.num_layers
        self.values: list[mx.array | None] = [None] * self.num_layers
        self.rows = 0
        self.capacity = 0
        self.row_of: dict[int, int] = {}  # sequence slot -> pool row
        self.length: dict[int, int] = {}  # sequence slot -> cached positions

    def free(self, slot: int) -> None:
        self.row_of.pop(slot, None)
        self.length.pop(slot, None)
        if not self.row_of:
            self.clear()

    def trim(self, slot: int, count: int) -> None:
        if slot in self.length:
            self.length[slot] = max(0, self.length[slot] - count)

    def open(self, slot: int) -> None:
        """Give a new sequence the lowest free row."""
        used = set(self.row_of.values())
        row = next(r for r in range(len(used) + 1) if r not in used)
        self.row_of[slot] = row
        self.length[slot] = 0

    def reserve(self, needed_positions: int) -> None:
        """Grow the buffers to hold every row in use and needed positions."""
        rows = max(self.row_of.values(), default=-1) + 1
        new_rows = self.rows if rows <= self.rows else -(-rows // ROWS_STEP) * ROWS_STEP
        new_cap = self.capacity
        if needed_positions > self.capacity:
            new_cap = -(-needed_positions // CAPACITY_STEP) * CAPACITY_STEP
        if (new_rows, new_cap) == (self.rows, self.capacity):
            return
        shape = (new_rows, self.kv_heads, new_cap, self.head_dim)
        for layer in range(self.num_layers):
            for buffers in (self.keys, self.values):
                grown = mx.zeros(shape, dtype=self.dtype)
                old = buffers[layer]
                if old is not None:
                    grown[: self.rows, :, : self.capacity, :] = old
                buffers[layer] = grown
        self.rows, self.capacity = new_rows, new_cap

    # Called by attention, per layer ----------------------------------------

    def position_index(self, rows: mx.array, offsets: mx.array) -> mx.array:
        """Where one new position per row goes in a layer's buffer seen as
        [rows * kv_heads * capacity, head_dim]; the same in every layer."""
        heads = mx.arange(self.kv_heads)
        index = (
            (rows[:, None] * self.kv_heads + heads[None, :]) * self.capacity
        ) + offsets[:, None]
        return index.reshape(-1)

    def write_positions(
        self, layer: int, index: mx.array, k: mx.array, v: mx.array
    ) -> None:
        """One new position per row, at `position_index`: k, v [B, kv_heads,
        head_dim]."""
        for buffers, new in ((self.keys, k), (self.values, v)):
            flat = buffers[layer].reshape(-1, self.head_dim)  # type: ignore[union-attr]
            buffers[layer] = None  # let the scatter update the buffer in place
            flat[index] = new.reshape(-1, self.head_dim)
            buffers[layer] = flat.reshape(
                self.rows, self.kv_heads, self.capacity, self.head_dim
            )

    def write_span(
        self, layer: int, row: int, offset: int, k: mx.array, v: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Positions [offset, offset+L) of one row: k, v [kv_heads, L, head_dim].
        Returns that row's keys and values up to offset+L, [1, kv_heads, S, d]."""
        end = offset + k.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        keys[row, :, offset:end, :] = k
        values[row, :, offset:end, :] = v
        self.keys[layer], self.values[layer] = keys, values
        return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
