"""`make ui`: the Airflow UI and the MLflow UI over the embedded state, until Ctrl-C (deploy/local/embedded.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.local.embedded import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
