"""The bounded multi-state: per-layer K/V buffers, the eviction policies, saved snapshots of a
sequence's state and the store that keeps them between turns."""
