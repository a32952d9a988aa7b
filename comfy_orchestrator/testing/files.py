"""The double's output, input and temp folders, with ComfyUI's file naming and path rules."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "Folders", "PathNotAllowed"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")


class PathNotAllowed(ValueError):
    """A file name or prefix that would leave its folder."""


class Folders:
    """``output``, ``input`` and ``temp`` under one base folder, as ComfyUI lays them out."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.output = base / "output"
        self.input = base / "input"
        self.temp = base / "temp"
        for folder in (self.output, self.input, self.temp):
            folder.mkdir(parents=True, exist_ok=True)
        self._counters: dict[tuple[Path, str], int] = {}

    def by_type(self, kind: str | None) -> Path | None:
        """The folder for a ``type`` query value (``None`` means input, like ComfyUI's upload)."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "input")

    def wipe_temp(self) -> None:
        """What a real server does at start-up; also forgets the file counters."""
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir(parents=True, exist_ok=True)
        self._counters.clear()

    def annotated(self, name: str, default: str = "input") -> Path:
        """Resolve ``"sub/x.png"`` or ``"x.png [output]"`` the way LoadImage does."""
        match = _ANNOTATION.match(name)
        kind = default
        if match is not None:
            name, kind = match["name"], match["kind"]
        folder = self.by_type(kind)
        assert folder is not None
        path = (folder / name).resolve()
        if os.path.commonpath((folder.resolve(), path)) != str(folder.resolve()):
            raise PathNotAllowed(name)
        return path

    def input_images(self) -> list[str]:
        """The top-level image files of the input folder, sorted (LoadImage's option list)."""
        return sorted(
            entry.name for entry in os.scandir(self.input)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )

    def file_hash(self, name: str) -> str:
        """LoadImage's IS_CHANGED: the sha256 of the file, or NaN-like when it is missing."""
        try:
            return hashlib.sha256(self.annotated(name).read_bytes()).hexdigest()
        except (OSError, PathNotAllowed):
            return "nan"

    def reserve(self, kind: str, prefix: str, count: int, extension: str) -> list[tuple[Path, str, str]]:
        """Paths for ``count`` new files named like ComfyUI's SaveImage: ``prefix_00001_.png``.

        Returns ``(path, filename, subfolder)`` for each. The counter continues from the highest one
        already on disk for that prefix, as ``folder_paths.get_save_image_path`` does.
        """
        root = self.by_type(kind)
        assert root is not None
        normalized = os.path.normpath(prefix)
        subfolder, filename = os.path.dirname(normalized), os.path.basename(normalized)
        base = os.path.abspath(root)
        folder = Path(os.path.abspath(os.path.join(base, subfolder)))
        if os.path.commonpath((base, str(folder))) != base:
            raise PathNotAllowed(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {folder}\n         output_dir: {root}"
            )
        key = (folder, filename.lower())
        counter = self._counters.get(key)
        if counter is None:
            folder.mkdir(parents=True, exist_ok=True)
            counter = self._scan(folder, filename)
        self._counters[key] = counter + count
        return [
            (folder / f"{filename}_{n:05}_{extension}", f"{filename}_{n:05}_{extension}", subfolder)
            for n in range(counter, counter + count)
        ]

    @staticmethod
    def _scan(folder: Path, filename: str) -> int:
        best = 0
        cut = len(filename) + 1
        for entry in os.listdir(folder):
            if entry[:cut].lower() != f"{filename}_".lower():
                continue
            digits = entry[cut:].split("_")[0]
            if digits.isdigit():
                best = max(best, int(digits))
        return best + 1
