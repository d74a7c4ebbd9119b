"""Shared low-level pieces every other layer may use: the user-error base, the time limit, the process group,
the disk guard, checkpoint I/O, content hashing and the training-loop core. Imports nothing of ours but
`kernels`-free standard and third-party packages."""
