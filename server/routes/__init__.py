"""HTTP endpoints; each module owns one group and exposes `router`."""
