"""Layer 3: live migration, which is replication that ends with a switchover: pre-copy rounds
streamed over the replication protocol to a standby that never fails over by itself, then a
brief stop-and-copy. Uses ``replication``'s transport and standby; nothing here is used by it."""
