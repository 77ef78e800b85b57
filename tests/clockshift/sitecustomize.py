"""Imported at start-up by a server the tests run with ``PYTHONPATH`` naming
this directory: its wall clock (``time.time``, ``time.time_ns``) reads
``CLOCKSHIFT_S`` seconds off the host's, as on a host whose clock NTP then
steps back (a real server, its clock alone moved)."""

import os
import time

_shift = float(os.environ.get("CLOCKSHIFT_S", "0") or 0)
if _shift:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _shift
    time.time_ns = lambda: _time_ns() + int(_shift * 1e9)
