"""Shared low-level pieces every other layer may use: the user-error base, the time limit, the process group,
the disk guard, checkpoint I/O, content hashing and the training-loop core. Imports only the standard library,
third-party packages and other `core` modules."""
