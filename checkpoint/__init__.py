"""Checkpoint, restart and migration's CRIU layer: `criu` (CRIU's RPC through pycriu) and
`store` (Kerrighed's versioned image store, /var/chkpt/<appid>/v<N>/). Only kerrighed.errors is
imported from the rest of the project."""
