"""CPU training: keep freed memory in the process instead of returning it to the OS at once."""

import ctypes
import ctypes.util


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    A training step allocates and frees tensors of tens of MB (ITG logits over BERT's 30k words,
    ITM's 3B pairs); by default glibc maps each afresh and the kernel zeroes its pages every time,
    which costs page faults and kernel time on every step (the README's stage-1 speed table: the
    step runs ~1.2x faster with this). The price is that the process keeps its peak memory.
    Returns False where there is no glibc (macOS, Windows, musl), which changes nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(mallopt(option, ctypes.c_int(value)) == 1
               for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_top_pad, 1 << 28)))
