"""What long jobs need from the operating system, imported by every layer above it:

* ``_files``: one writer per file or folder (``exclusive_lock``, ``LockedError``), atomic
  writes (``atomic_write``, ``atomic_write_bytes``, ``atomic_write_text``), appends that
  are whole or absent (``append_durably``), leftovers (``remove_stale_tmp``), full disks
  reported as such in one line (``DiskFullError``, ``disk_errors``, ``is_disk_full``);
* ``_progress``: ``progress`` (a bar on a terminal, plain timed lines in a log), and
  ``quiet_library_noise`` / ``quiet_stderr_fd`` (library noise held back);
* ``_layout``: names of files and keys a writer and a reader in different layers share
  (medcap's safetensors header key, the files of a ``medcap export`` folder).

Import the names from here (``from medcap._io import atomic_write, progress``); this
package imports nothing from the rest of medcap.
"""

# The names callers use, re-exported (a private package: no __all__, nothing exported).
from medcap._io._files import (  # noqa: F401
    DiskFullError,
    LockedError,
    append_durably,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    disk_errors,
    exclusive_lock,
    is_disk_full,
    remove_stale_tmp,
)
from medcap._io._layout import (  # noqa: F401
    EXPORT_CONFIG,
    EXPORT_SPECIAL_TOKENS,
    EXPORT_TOKENIZER,
    EXPORT_VISION,
    HEADER_KEY,
)
from medcap._io._progress import progress, quiet_library_noise, quiet_stderr_fd  # noqa: F401
