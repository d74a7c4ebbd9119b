"""Where the project's own folders are: the checkout root, the presets, the default runs folder."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
RUNS_DIR = REPO_ROOT / "runs"
