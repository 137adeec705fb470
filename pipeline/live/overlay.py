"""What the live runner shows and writes: the annotated frame, the window, the output video and predictions.

Outputs are written under a hidden partial name (``.out.partial.mp4``, ``.preds.jsonl.partial``) and renamed
when finished and checked, so a full disk or a crash never leaves a complete-looking file, and an older
output of the same name stays until the new one is whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.names import IMAGE_SUFFIXES
from pipeline.live.sources import quiet_opencv

log = logging.getLogger(__name__)

MIN_VIEW_SIDE = 360  # smaller frames (Tiny ImageNet's 64x64) are enlarged for display and the output video
WARNING_COLOR = (0, 80, 255)  # BGR orange-red: the overlay's warning line
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/share/fonts", "/usr/local/share/fonts",
             "/Library/Fonts", "C:/Windows/Fonts")  # for OpenCV's bundled Qt, which looks for fonts only in its own folder


def view(bgr: np.ndarray, min_side: int = MIN_VIEW_SIDE) -> np.ndarray:
    """The canvas to draw on: the frame itself, or an enlarged copy of a small one."""
    h, w = bgr.shape[:2]
    if min(h, w) >= min_side:
        return bgr
    scale = min_side / min(h, w)
    return cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_NEAREST)


def annotate(bgr: np.ndarray, topk: list[dict], fps: float | None, warning: str | None = None) -> np.ndarray:
    """Draw the top-k names with probabilities, the FPS and an optional warning line on ``bgr`` (in place) over
    a dark box; return it."""
    lines = [f"{i}. {t['name'][:32]}  {100 * t['prob']:5.1f}%" for i, t in enumerate(topk, 1)]
    lines.append(f"FPS {fps:5.1f}" if fps else "FPS   -")
    return draw_lines(bgr, lines, warning)


def draw_lines(bgr: np.ndarray, lines: list[str], warning: str | None = None) -> np.ndarray:
    """Draw ``lines`` (white) and an optional last ``warning`` line (orange) top left on ``bgr`` (in place) over
    a dark box; return it."""
    h, w = bgr.shape[:2]
    scale = max(0.45, min(h, w) / 800)
    thickness = 1 if scale < 0.7 else 2
    font = cv2.FONT_HERSHEY_SIMPLEX
    lines = list(lines)
    if warning:
        lines.append(warning)
    sizes = [cv2.getTextSize(line, font, scale, thickness) for line in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + int(8 * scale)
    pad = int(8 * scale) + 2
    box_w = min(w, max(s[0][0] for s in sizes) + 2 * pad)
    box_h = min(h, line_h * len(lines) + 2 * pad)
    roi = bgr[:box_h, :box_w]
    roi >>= 2  # a dark box (a quarter of the brightness) keeps the text legible on any frame
    y = pad
    for i, (line, (_, baseline)) in enumerate(zip(lines, sizes)):
        y += line_h
        color = WARNING_COLOR if warning and i == len(lines) - 1 else (255, 255, 255)
        cv2.putText(bgr, line, (pad, y - baseline - 2), font, scale, color, thickness, cv2.LINE_AA)
    return bgr


FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".pfa", ".pfb")  # what Qt's font database reads from QT_QPA_FONTDIR


def _has_fonts(folder: str) -> bool:
    try:
        return any(name.lower().endswith(FONT_SUFFIXES) for name in os.listdir(folder))
    except OSError:
        return False


def _font_folders():
    """FONT_DIRS, each followed by its subfolders (Qt reads font files from the one folder, not below it)."""
    for folder in FONT_DIRS:
        for root, _, _ in os.walk(folder):
            yield root


def _opencv_font_dir() -> str:
    """The folder ``import cv2`` points QT_QPA_FONTDIR at: inside the opencv-python package, which ships no fonts."""
    return os.path.join(os.path.dirname(os.path.abspath(cv2.__file__)), "qt", "fonts")


def quiet_qt() -> None:
    """Before the first window: point OpenCV's Qt at the system fonts and mute its font-database warnings.

    ``import cv2`` (opencv-python's bundled Qt) sets QT_QPA_FONTDIR to a folder of its own that holds no fonts,
    and Qt then prints "QFontDatabase: Cannot find font directory" five times per window. So that value, or
    none, is replaced by the first system font folder; a folder the user chose is kept.
    """
    current = os.environ.get("QT_QPA_FONTDIR")
    ours = current is not None and os.path.normpath(current) == os.path.normpath(_opencv_font_dir())
    if current is None or (ours and not _has_fonts(current)):
        found = next((folder for folder in _font_folders() if _has_fonts(folder)), None)
        if found:
            os.environ["QT_QPA_FONTDIR"] = found
    if "QT_LOGGING_RULES" not in os.environ:
        os.environ["QT_LOGGING_RULES"] = "qt.qpa.fonts=false"


def _opencv_has_gui() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip().upper() not in ("NONE", "NO")
    return True


def display_available() -> bool:
    """A window can be shown: macOS or Windows, or DISPLAY / WAYLAND_DISPLAY set, and an OpenCV with a GUI."""
    if sys.platform == "darwin" or sys.platform.startswith("win"):
        screen = True
    else:
        screen = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return screen and _opencv_has_gui()


class Display:
    """The window: cv2.imshow / waitKey / destroyAllWindows, looked up at call time so tests can replace them."""

    def __init__(self, window: str):
        self.window = window
        self.shown = False

    def show(self, image: np.ndarray) -> None:
        if not self.shown:
            quiet_qt()
        cv2.imshow(self.window, image)
        self.shown = True

    def key(self, delay_ms: int) -> int:
        """The key pressed within ``delay_ms`` (0: wait for one) as 0-255, or -1."""
        key = cv2.waitKey(delay_ms)
        return -1 if key < 0 else key & 0xFF

    def closed(self) -> bool:
        """The user closed the window with its close button."""
        try:
            return self.shown and cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1
        except cv2.error:
            return False

    def close(self) -> None:
        try:
            cv2.destroyAllWindows()
            cv2.waitKey(1)  # lets HighGUI process the destroy on platforms that need an event turn
        except cv2.error:  # no window was ever shown (the GUI failed to start)
            pass


def partial_path(path: Path) -> Path:
    """Where an output is written until it is finished: hidden, and the video keeps its suffix (its container).

    A device or pipe (``/dev/stdout``, a FIFO) is written directly; a symlink's target is what gets replaced.
    """
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        return path
    if path.suffix.lower() in (".mp4", ".avi", ".mkv", ".mov", ".m4v"):
        return path.with_name(f".{path.stem}.partial{path.suffix}")
    return path.with_name(f".{path.name}.partial")


def _move_into_place(partial: Path, path: Path) -> None:
    target = Path(os.path.realpath(path))
    if partial != target:
        os.replace(partial, target)


def _write_failed(path: Path, err: OSError) -> UserError:
    return UserError(f"cannot write {path} ({err.strerror or err}); free some space or choose another folder, then rerun")


class VideoOutput:
    """The annotated video: opened on the first frame (its size), mp4v; later frames are fitted to that size.

    Written to ``partial_path(path)``; ``finish`` checks that every frame reads back (OpenCV's writer reports
    no write errors: a full disk gives a file of 0 readable frames) and renames it to ``path``.
    """

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        self.partial = partial_path(self.path)
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self.size = (bgr.shape[1], bgr.shape[0])
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _write_failed(self.path, err) from None
            with quiet_opencv():
                self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise UserError(f"cannot write video {self.path} (mp4v at {self.size[0]}x{self.size[1]}); "
                                "use an .mp4 name in a writable folder")
            log.info("writing %s (%dx%d, %g fps)", self.path, *self.size, self.fps)
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        with quiet_opencv():  # a full disk makes OpenCV warn on every frame; the read-back check reports it once
            self.writer.write(bgr)
        self.frames += 1

    def release(self) -> None:
        if self.writer is not None:
            with quiet_opencv():
                self.writer.release()
            self.writer = None

    def readable_frames(self) -> int:
        """Frames the partial file gives back: its recorded count when the first and last frames decode, else 0."""
        if not self.partial.is_file() or self.partial.stat().st_size == 0:
            return 0
        with quiet_opencv():
            capture = cv2.VideoCapture(str(self.partial))
        try:
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if capture.isOpened() else 0
            if count <= 0 or not capture.read()[0]:
                return 0
            if count > 1:
                capture.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
                if not capture.read()[0]:
                    return 0
            return count
        finally:
            capture.release()

    def finish(self) -> bool:
        """Close, check and rename into place (True; False when no frame came); a video that does not read
        back is removed and reported."""
        self.release()
        if not self.frames:
            return False
        readable = self.readable_frames()
        if readable != self.frames:
            free = shutil.disk_usage(self.partial.parent).free if self.partial.parent.is_dir() else 0
            self.discard()
            raise UserError(f"the video {self.path} was not written completely ({readable} of {self.frames} frames "
                            f"read back; {free / 2**20:.0f} MiB free there): free some space or choose another "
                            "folder, then rerun")
        _move_into_place(self.partial, self.path)
        return True

    def discard(self) -> None:
        self.release()
        if self.partial.is_file() and self.partial != Path(os.path.realpath(self.path)):
            self.partial.unlink()


class PredictionsOutput:
    """One JSON line per frame, written to ``partial_path(path)`` and renamed when finished."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.partial, "w", buffering=1)  # line-buffered: a kill loses at most a line
        except OSError as err:
            raise _write_failed(self.path, err) from None

    def write(self, record: dict) -> None:
        try:
            line = json.dumps(record, allow_nan=False)
        except ValueError:  # NaN or Inf: not JSON
            raise UserError(f"frame {record.get('frame')} gave non-finite probabilities; the head or backbone "
                            "is damaged: retrain the head with run_train_head.py") from None
        try:
            self.file.write(line + "\n")
        except OSError as err:
            raise _write_failed(self.path, err) from None

    def finish(self) -> bool:
        try:
            self.file.flush()
            if self.partial != Path(os.path.realpath(self.path)):
                os.fsync(self.file.fileno())
            self.file.close()
        except OSError as err:
            self.discard()
            raise _write_failed(self.path, err) from None
        _move_into_place(self.partial, self.path)
        return True

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        if self.partial.is_file() and self.partial != Path(os.path.realpath(self.path)):
            self.partial.unlink()


def _same_file(a: Path, b: Path) -> bool:
    """The same file, after symlinks (resolve) and hard links (samefile)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return False


def check_output_paths(outputs: dict[str, Path | None], inputs: dict[str, Path | None],
                       source_folder: Path | None = None) -> None:
    """Refuse an output that is an input, another output or a folder, before anything is opened for writing.

    ``outputs`` and ``inputs`` map an option (``--output``) to its file; a ``source_folder``'s images are inputs.
    """
    given = [(flag, Path(path)) for flag, path in outputs.items() if path is not None]
    for i, (flag, path) in enumerate(given):
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; pass a file name")
        for other_flag, other in given[:i]:
            if _same_file(path, other):
                raise UserError(f"{other_flag} and {flag} are the same file ({path}); pass two different files")
        for input_flag, source in inputs.items():
            if source is not None and _same_file(path, Path(source)):
                raise UserError(f"{flag} {path} is the {input_flag} file: writing it would destroy the input; "
                                "pass another file")
        if source_folder is not None:
            inside = path.resolve().parent == Path(source_folder).resolve()
            linked = path.exists() and any(p.is_file() and _same_file(path, p) for p in Path(source_folder).iterdir())
            if linked or (inside and (path.exists() or path.suffix.lower() in IMAGE_SUFFIXES)):
                raise UserError(f"{flag} {path} is a file of the --source folder {source_folder}: writing it would "
                                "destroy or add an input; pass a file outside that folder")
