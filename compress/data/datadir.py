"""Where the real data lives: the `--data-dir` flag, else $COMPRESS_DATA_DIR, else nowhere (the `datasets`
library online). Layout below it: glue/TASK/{train,dev}.tsv[.gz], squad/{train,dev}-v1.1.json[.gz] (and
-v2.0), text/ for calibration and perplexity.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import UserError


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory from the flag or $COMPRESS_DATA_DIR; None means "use `datasets` online"."""
    if data_dir is None:
        data_dir = os.environ.get("COMPRESS_DATA_DIR") or None
    if data_dir is None:
        return None
    path = Path(data_dir)
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist")
    return path
