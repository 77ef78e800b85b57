# cython: language_level=3
"""Native hot path of kvstore (see kvstore/_impl.py for how it is chosen).

The pure-Python modules are the specification; every function here matches
its reference byte for byte.
"""

from libc.string cimport memcpy


def copy_into(unsigned char[::1] dst not None, const unsigned char[::1] src not None,
              Py_ssize_t offset=0):
    """Copy ``src`` into ``dst[offset:]`` without holding the GIL."""
    cdef Py_ssize_t n = src.shape[0]
    if offset < 0 or offset + n > dst.shape[0]:
        raise ValueError(f"copy of {n} bytes at offset {offset} overflows a {dst.shape[0]}-byte buffer")
    if n:
        with nogil:
            memcpy(&dst[offset], &src[0], n)
    return n
