"""glibc allocator settings for CPU runs.

By default glibc gives every freed block over a few MB back to the OS, and the next
allocation of the same size page-faults it back in. Decoders allocate and free the same
large activations over and over (every chunk of queries at inference, every layer at
every training step), so on CPU that churn costs a lot: measured on 2 cores, one LIIF
training step (batch 16, 2304 queries) takes 2.3 s by default and 1.5 s with
:data:`TRAINING`. No-op where the C library is not glibc.
"""
import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# (blocks at least this big get their own mapping, free memory kept at the heap top)
INFERENCE = (64 << 20, 128 << 20)  # chunks of a few MB; keeps peak RSS close to what is live
TRAINING = (1 << 30, 2 << 30)  # a training step's activations are 100+ MB each


def keep_freed_buffers(setting):
    """Apply ``setting`` (one of the tuples above) to this process; True when applied."""
    mmap_threshold, trim_threshold = setting
    try:
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                    and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False
