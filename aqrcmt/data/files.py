"""The dataset's files, read strictly.

- :func:`read_pickle`: index / database pickles through an unpickler that only builds plain containers and numpy
  arrays (a pickle naming any other global is refused), with errors that name the file;
- :func:`read_image`: camera images decoded strictly (a truncated or corrupt file is a :class:`BadSampleError`
  naming it, never a grey-padded image with a nameless decoder warning on stderr).

They are written whole by :mod:`aqrcmt.atomic` (atomic files, staged folders).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from aqrcmt.errors import AqrcmtError

# The globals an mmdet3d / aqrcmt info or database pickle needs: numpy arrays, dtypes and scalars (numpy 1 and 2
# module paths), the bytes codec of protocol-2 pickles, and ordered dicts.
_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")])
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_DECODE_LOCK = threading.Lock()   # one decode at a time owns this process's stderr


class BadSampleError(AqrcmtError, RuntimeError):
    """A sample's files or contents are unusable (missing/truncated file, no points, NaN, no boxes)."""


class DatasetError(AqrcmtError, ValueError):
    """The dataset's root, split or index file is unusable; the message names the file, sample and field."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name} (only numpy arrays and plain "
                                         f"containers are allowed)")
        return super().find_class(module, name)


def read_pickle(path: str | Path, what: str) -> Any:
    """The object pickled in `path` (`what` names the file's role in messages, e.g. "info pkl").

    Raises FileNotFoundError when absent and DatasetError when the bytes are not such a pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        return _ArrayUnpickler(io.BytesIO(data)).load()
    except Exception as error:   # any failure of the unpickler on these bytes: the file is not a valid pickle
        raise DatasetError(f"{what} {path} is not a readable pickle file ({type(error).__name__}: {error})") from None


def read_image(path: Path, what: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR pixels of the image at `path`, decoded strictly; `what` starts the error messages
    (e.g. "sample <token>: CAM_FRONT image").

    A missing, truncated (a JPEG without its end-of-image marker, as after an interrupted copy) or undecodable
    file raises BadSampleError naming `path`, and so does an image the decoder only warns about (libjpeg's
    "Corrupt JPEG data: premature end of data segment" for a cut-short or scrambled scan, which it fills with
    grey): those messages are captured from the C library's stderr during the decode and reported with the file
    name. (PIL is not used: it decodes such files without passing libjpeg's warnings on.)
    """
    if not path.is_file():
        raise BadSampleError(f"{what} {path} does not exist")
    data = path.read_bytes()
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00").endswith(_JPEG_END):
        raise BadSampleError(f"{what} {path} is a truncated JPEG (no end-of-image marker)")
    with _DECODE_LOCK, _captured_stderr() as messages:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadSampleError(f"{what} {path} is truncated or not a readable image")
    if messages:
        raise BadSampleError(f"{what} {path} is corrupt: the decoder reports {' / '.join(messages)!r}")
    return image


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where C libraries print) to a temporary file; the yielded list holds, after the
    block, the non-empty lines written meanwhile."""
    lines: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]
