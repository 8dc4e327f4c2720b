"""The one way the harness replaces a file: all of the new content or none of it.

The content goes to a hidden temporary file beside the target, which is fsynced, renamed
over the target, and then the folder is fsynced, so that after a kill or a power cut the
name points at either the old file or the whole new one, and the rename itself is on disk.
Every file a reader trusts goes through :func:`write_atomically`: meta.json and COMPLETE
(experiments/results.py), model.pt and the checkpoints (experiments/checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

#: What to write: text (UTF-8), bytes, or a function writing into the open binary file
#: (``lambda handle: torch.save(obj, handle)``).
Content = Union[str, bytes, Callable[[BinaryIO], None]]


def write_atomically(path: Path, content: Content) -> None:
    """Replace ``path`` with ``content``: temporary file, fsync, rename, fsync of the folder.
    A failure (a full disk) leaves the previous file and removes the temporary one."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        # open() rather than mkstemp: the file gets the umask's mode, as any other the run writes.
        with open(temp, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """Make the names in ``folder`` (a rename, a new file) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
