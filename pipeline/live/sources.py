"""Frame sources for the live runner: a camera, a video file, an image file or a folder of images. Torch-free.

Camera and video frames come from OpenCV as BGR and are converted to RGB. Image files are decoded by the
``decode`` function a source is given: the torch runtime passes ``torch_decoder()`` (torchvision, exactly
as extraction decodes them), the torch-free runtimes ``opencv_decoder()`` (OpenCV; a large JPEG reduced by
libjpeg at the scale extraction uses, as ``torch_decoder`` does).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from pipeline.common.errors import UserError, first_line
from pipeline.datasets.jpeg import decode_with_pillow, draft_scale, jpeg_frame, reduction
from pipeline.common.names import IMAGE_SUFFIXES
from pipeline.common.preprocess import aspect_problem

log = logging.getLogger(__name__)

CAMERA_RETRIES = 3  # consecutive failed reads before a camera counts as stopped


@dataclass
class Frame:
    source: str  # the "source" of the predictions line: image path, camera index or video path
    rgb: np.ndarray  # (H, W, 3) uint8 RGB: what the network sees
    bgr: np.ndarray  # (H, W, 3) uint8 BGR: what is drawn on


class DecodeError(Exception):
    """An image file whose bytes are not a usable image (a folder skips it); the message is the reason."""


Decoder = Callable[[Path], np.ndarray]  # an image file -> (H, W, 3) uint8 RGB; DecodeError or OSError


def cannot_read(path: str | Path, err: OSError) -> UserError:
    """The one-line error for a file that cannot be read at all (not a skip: the run stops)."""
    return UserError(f"cannot read {path} ({err.strerror or first_line(err)}); check the drive and the file's "
                     "permissions, then rerun")


REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}


def opencv_decoder(min_side: int | None = None) -> Decoder:
    """OpenCV alone (the torch-free runtimes): an image file -> (H, W, 3) uint8 RGB, turned as its EXIF
    orientation says; 16-bit images are scaled to 8 bits.

    ``min_side``: a large JPEG is decoded reduced, at the scale extraction's decode takes for the same floor
    (jpeg.draft_scale, jpeg.decode_floor). libjpeg does the scaling for OpenCV's ``IMREAD_REDUCED_*`` as it does
    for PIL's ``draft``, so the runtime sees the pixels the cached row was made from, not a full decode's.
    A CMYK JPEG is decoded by Pillow (decode_cmyk), whose colour conversion is torchvision's."""
    def decode(path: Path) -> np.ndarray:
        with open(path, "rb") as f:  # an OSError here is a read failure, not a bad image
            data = f.read()
        if not data:
            raise DecodeError("empty file")
        frame = jpeg_frame(data)
        size = None if frame is None else (frame.width, frame.height)
        if frame is not None and frame.components == 4:
            return decode_cmyk(data, reduction(size, min_side) if min_side else 1)
        scale = draft_scale(size, min_side) if min_side else 1
        with quiet_opencv():
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED_COLOR[scale])
        if bgr is None:
            raise DecodeError("cannot decode (not an image OpenCV can read, or damaged)")
        problem = aspect_problem(*bgr.shape[:2])  # skipped as extraction and the torch runtime skip it
        if problem:
            raise DecodeError(problem)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    return decode


def decode_cmyk(data: bytes, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a CMYK JPEG, decoded as extraction decodes it (Pillow; reduced as its ``draft`` is
    asked for 1/``scale``): OpenCV's own CMYK -> RGB is a level off on almost every pixel."""
    try:
        return decode_with_pillow(data, scale)
    except ImportError:
        raise DecodeError("a CMYK JPEG, which only Pillow decodes as extraction did (OpenCV's colours differ); pip "
                          "install Pillow (it is in requirements-deploy.txt), or convert the image to RGB") from None
    except (OSError, ValueError, SyntaxError) as err:  # Pillow says "truncated", "broken data stream", ...
        raise DecodeError(f"cannot decode ({first_line(err, last=True)})") from None


decode_with_opencv = opencv_decoder()  # full size: what --collect saves, and frames from files by default


def torch_decoder(min_side: int | None = None) -> Decoder:
    """torchvision's decoder, exactly as extraction decodes (imports torch: for the torch runtime only).

    ``min_side``: a large JPEG is decoded reduced to no less than this, as extraction does for the same
    preprocessing (jpeg.decode_floor); the classifier then sees the pixels the cache was made from."""
    from pipeline.datasets.images import ImageDecodeError, read_rgb

    def decode(path: Path) -> np.ndarray:
        try:
            rgb = read_rgb(path, min_side=min_side)  # (3, H, W) uint8
        except ImageDecodeError as err:
            raise DecodeError(str(err)) from None
        return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy())

    return decode


def open_capture(target: int | str) -> cv2.VideoCapture:
    """cv2.VideoCapture, with OpenCV's own warnings muted (a failed open is reported as one clear line)."""
    with quiet_opencv():
        return cv2.VideoCapture(target)


@contextmanager
def quiet_opencv():
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def bgr_to_frame(source: str, bgr: np.ndarray) -> Frame:
    return Frame(source, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), bgr)  # (H, W, 3) contiguous


def rgb_to_frame(source: str, rgb: np.ndarray) -> Frame:
    return Frame(source, rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


class FrameSource:
    """Iterate for Frames; release() frees the device or file. ``fps`` is None when unknown."""

    label: str = ""
    fps: float | None = None
    still: bool = False  # still images: a window waits for a key on each one
    camera: bool = False  # a live camera: classified one frame at a time, never batched

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def release(self) -> None:
        pass


class CaptureSource(FrameSource):
    """A camera or a video file read with cv2.VideoCapture."""

    def __init__(self, capture, label: str, *, camera: bool):
        self.capture, self.label, self.camera = capture, label, camera
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self.frames = 0
        self.stopped = False  # a camera that stopped delivering frames

    def frame_size(self) -> tuple[int, int] | None:
        """(width, height) as the capture reports it, or None when it does not."""
        size = (int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
        return size if size[0] > 0 and size[1] > 0 else None

    def _read(self) -> np.ndarray | None:
        tries = CAMERA_RETRIES if self.camera and self.frames else 1  # a video's end is final at once
        for attempt in range(tries):
            ok, bgr = self.capture.read()
            if ok and bgr is not None:
                return bgr
            if attempt + 1 < tries:
                time.sleep(0.05)
        return None

    def __iter__(self) -> Iterator[Frame]:
        while True:
            bgr = self._read()
            if bgr is None:
                break
            if bgr.ndim == 2:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
            elif bgr.shape[2] == 4:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_BGRA2BGR)
            self.frames += 1
            yield bgr_to_frame(self.label, bgr)
        if self.camera:
            if not self.frames:
                raise UserError(f"camera {self.label} opened but delivered no frames; is another program using it? "
                                "Try another --source index")
            self.stopped = True
            log.warning("camera %s stopped delivering frames after %d frames; stopping", self.label, self.frames)
        elif not self.frames:
            raise UserError(f"cannot read any frame from video {self.label}; it is empty, damaged, "
                            "or in a codec this OpenCV build cannot decode")
        else:
            log.info("end of video %s after %d frames", self.label, self.frames)

    def release(self) -> None:
        self.capture.release()


class ImageSource(FrameSource):
    """Image files, decoded to RGB by ``decode`` (the torch runtime: as extraction decodes them)."""

    still = True

    def __init__(self, paths: list[Path], label: str, *, folder: bool, decode: Decoder = decode_with_opencv):
        self.paths, self.label, self.folder, self.decode = paths, label, folder, decode

    def __iter__(self) -> Iterator[Frame]:
        good = 0
        for path in self.paths:
            try:
                rgb = self.decode(path)
            except DecodeError as err:  # bad content: a folder skips it (and says so), one image is an error
                if not self.folder:
                    raise UserError(f"cannot read image {path}: {err}") from None
                log.warning("skipping %s: %s", path, err)
                continue
            except OSError as err:  # the file cannot be read at all: stop, as extraction does
                raise cannot_read(path, err) from None
            good += 1
            yield rgb_to_frame(str(path), rgb)
        if self.folder and not good:
            raise UserError(f"none of the {len(self.paths)} images in {self.label} could be read")


def open_source(source: str, *, width: int | None = None, height: int | None = None,
                decode: Decoder | None = None) -> FrameSource:
    """A camera index ("0"), a video file, an image file or a folder of images.

    ``decode``: how image files are decoded; None: torchvision's decoder (as extraction decodes them).
    """
    text = str(source).strip()
    if text.isdigit():
        index = int(text)
        capture = open_capture(index)
        if not capture.isOpened():
            capture.release()
            raise UserError(f"cannot open camera {index} (no camera with that index, or it is in use); "
                            "pass --source with another camera index, a video file, an image or a folder")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, width), (cv2.CAP_PROP_FRAME_HEIGHT, height)):
            if value:
                capture.set(prop, value)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of stale ones (if supported)
        got = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if (width and got[0] != width) or (height and got[1] != height):
            log.warning("camera %d gives %dx%d, not the requested %sx%s", index, got[0], got[1], width or "-", height or "-")
        log.info("camera %d: %dx%d", index, *got)
        return CaptureSource(capture, str(index), camera=True)
    if width or height:
        log.warning("--width/--height apply to cameras only; ignored for %s", text)
    path = Path(text).expanduser()
    if path.is_dir():
        images = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        dangling = [p for p in images if p.is_symlink() and not p.exists()]
        if dangling:  # a link whose target is gone (a vanished drive): a read failure, as in extraction
            raise UserError(f"cannot read {dangling[0]} (a link to {os.readlink(dangling[0])}, which does not exist); "
                            "reconnect the drive or fix the link, then rerun")
        paths = sorted(p for p in images if p.is_file())
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        log.info("%s: %d images", path, len(paths))
        return ImageSource(paths, str(path), folder=True, decode=decode or torch_decoder())
    if not path.is_file():
        raise UserError(f"no such file or folder: {path}; --source takes a camera index, a video, an image or a folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource([path], str(path), folder=False, decode=decode or torch_decoder())
    capture = open_capture(str(path))
    if not capture.isOpened():
        capture.release()
        raise UserError(f"cannot open video {path}: it is not a video, is damaged, "
                        "or uses a codec this OpenCV build cannot decode")
    source = CaptureSource(capture, str(path), camera=False)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    log.info("video %s: %s frames at %s fps", path, count if count > 0 else "?", f"{source.fps:g}" if source.fps else "?")
    return source
