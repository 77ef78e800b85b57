"""Helpers of ``bench.peers``: the raw-socket baseline, the Redis process and
the client worker processes."""
