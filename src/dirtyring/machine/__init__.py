"""Layer 2: a runnable VM. The machine (memory slots, vCPU threads or one inline vCPU, devices,
its tracker), its configuration, the epoch driver, the one capture of dirty pages and machine
state every product uses, memory fingerprints, and the native helpers."""
