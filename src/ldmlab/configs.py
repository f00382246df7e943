"""Where the Hydra config tree lives: package data (`src/ldmlab/conf`, which the repo's `conf/` links to), so a
non-editable install (`pip install .`) finds it as well as a checkout does. `LDMLAB_CONF` points elsewhere."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

CONF_DIR = Path(os.environ.get("LDMLAB_CONF") or str(files("ldmlab") / "conf"))
