"""Layer 3: Remus-style replication. A primary runs the guest in epochs and streams each
checkpoint, through its uplink process, to a standby that commits it and takes over when the
primary dies; guest output is released only once its checkpoint is acknowledged, and an etcd
arbiter makes sure only one copy is ever live. Also the socket transport every product shares
and the key-value service front end."""
