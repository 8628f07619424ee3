"""Writing files so that no reader ever sees half of one: checkpoints, training states, images,
ONNX graphs, demo data and zoo downloads all go through :func:`replaced_atomically`."""
import contextlib
import os


@contextlib.contextmanager
def replaced_atomically(path, suffix=''):
    """Yield a temporary name beside ``path`` (``.<name>.tmp<pid><suffix>``; ``suffix`` for
    writers that pick the format by extension). When the block ends without an error the file
    is flushed to disk and renamed onto ``path``; otherwise it is removed. A kill at any moment
    leaves ``path`` as it was (or absent) plus, at worst, a dot-named leftover."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}{suffix}')
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, write):
    """Call ``write(f)`` on a binary file that becomes ``path`` only once complete."""
    with replaced_atomically(path) as tmp, open(tmp, 'wb') as f:
        write(f)
