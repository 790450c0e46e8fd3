"""Layer 3: the products built on machine + tracking + wire (replication; snapshots and
migration reuse the same checkpoint capture). The only layer where clocks, sockets and threads
meet the machine."""
