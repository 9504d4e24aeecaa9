"""Images on local disk under the data dir.

Results live at ``images/<job id>/<index>.png``: the path is a function of (job, index), and files
are written to a temporary name, fsynced and renamed into place, so a job run twice (its worker
died) overwrites its own files instead of leaving a second copy. The temporary name is a
function of the path too: only the job's lease holder writes its files, under the job's row
lock, so there is one writer per path at a time, and a writer killed mid-write leaves a
temporary file that the job's next run overwrites and renames. Every stored image is re-encoded
by us (never the bytes a client sent).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def encode_png(image: Image.Image, *, infotext: str = "", recipe: dict[str, Any] | None = None) -> bytes:
    """PNG bytes with the A1111 ``parameters`` text and the malerei JSON recipe embedded."""
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    if recipe:
        info.add_text("malerei", json.dumps(recipe, sort_keys=True))
    out = io.BytesIO()
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def result_path(self, job_id: str, index: int) -> str:
        return f"{job_id}/{index}.png"

    def write(self, rel: str, data: bytes) -> None:
        target = self._resolve(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def read(self, rel: str) -> bytes:
        return self._resolve(rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return self._resolve(rel).is_file()

    def delete(self, rel: str) -> None:
        self._resolve(rel).unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._resolve(job_id), ignore_errors=True)

    def _resolve(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"path {rel!r} escapes the image store")
        return path
