"""Layer 3: checkpoints kept rather than streamed: snapshot files and chains of incremental
snapshots (written as the same wire frames replication sends), and fast in-memory rollback to a
marked root point."""
