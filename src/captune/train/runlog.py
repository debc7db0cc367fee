"""What a training run reports: a plain-text log, `log.jsonl` (one record per logged step) and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Only the main process writes; the others' calls are no-ops."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.text = open(out / "train.log", "a", encoding="utf-8")
        self.jsonl = open(out / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self.info("tensorboard is not installed: no TensorBoard logs (pip install 'captune[train]')")
            else:
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def info(self, message: str, echo: bool = True) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.text.write(line + "\n")
        self.text.flush()
        if echo:
            from tqdm import tqdm

            tqdm.write(f"captune: {message}")

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": prefix, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.text.close()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def read_log(out: str | Path, kind: str = "train") -> list[dict]:
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]
