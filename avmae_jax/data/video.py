"""Video side of dataset preparation: choosing, decoding, resizing and JPEG-encoding frames.

Positions follow the reference extractor (cav-mae spec section 2): with
total = min(frame_count, int(fps * 10)), frame i of n is the decoded frame at index
max(int(i * total / n) - 1, 0). n = 10 is CAV-MAE; n = 20 over 10 s is the denser 2 frames/s
option MAViL's 8-frame windows are drawn from. Each frame: shorter side resized to 224
(bilinear, as torchvision's Resize on PIL images), centre-cropped to 224x224, JPEG-encoded.
"""

import io
import os

import av
import numpy as np
from PIL import Image

from avmae_jax.data import schema

# PIL's default quality, which the reference's torchvision `save_image(..., '*.jpg')` gets.
DEFAULT_JPEG_QUALITY = 75
REFERENCE_SECONDS = 10.0


class VideoError(ValueError):
  """A clip's frames cannot be extracted; the message names the file and the reason."""


def frame_indices(total: int, num_frames: int) -> np.ndarray:
  """Decoded-frame indices the reference picks out of `total` frames, [num_frames] int."""
  if total <= 0:
    raise ValueError(f"No frames to choose from (total={total}).")
  idx = np.array([int(i * (total / num_frames)) - 1 for i in range(num_frames)], np.int64)
  return np.clip(idx, 0, total - 1)


def resize_center_crop(image: Image.Image, size: int = schema.FRAME_SIZE) -> Image.Image:
  """Shorter side to `size` (bilinear, antialiased), then the central size x size square."""
  w, h = image.size
  if (w, h) != (size, size):
    # torchvision.transforms.Resize(int) on PIL: the long side is truncated, not rounded.
    if w <= h:
      new_w, new_h = size, int(size * h / w)
    else:
      new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
      image = image.resize((new_w, new_h), Image.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
  return image


def encode_jpeg(image: Image.Image | np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def process_image(image: Image.Image | np.ndarray, size: int = schema.FRAME_SIZE,
                  quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
  """The stored form of one frame: RGB, resize + centre crop, JPEG bytes."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return encode_jpeg(resize_center_crop(image.convert("RGB"), size), quality)


def _frame_rate(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return float(rate)
  return 0.0


def _stream_seconds(container, stream) -> float:
  if stream.duration and stream.time_base:
    return float(stream.duration * stream.time_base)
  if container.duration:
    return container.duration / 1e6  # AV_TIME_BASE
  return 0.0


def extract_frames(path: os.PathLike | str,
                   num_frames: int = schema.CAV_MAE_NUM_FRAMES,
                   seconds: float = REFERENCE_SECONDS,
                   size: int = schema.FRAME_SIZE,
                   quality: int = DEFAULT_JPEG_QUALITY) -> tuple[list[bytes], np.ndarray]:
  """Decodes the reference's frame positions of a video.

  Args:
    path: any container/codec FFmpeg reads.
    num_frames: frames to keep, evenly spread over the first `seconds`.
    seconds: span the positions cover (10 s in the reference).
    size: output side in pixels.
    quality: JPEG quality.

  Returns:
    (JPEG bytes per frame, float32 [num_frames] presentation time in seconds of each).

  Raises:
    VideoError: unreadable file, no video stream or no decodable frame.
  """
  path = os.fspath(path)
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise VideoError(f"{path}: cannot open ({e})") from e
  with container:
    if not container.streams.video:
      raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    fps = _frame_rate(stream)
    count = stream.frames or int(round(_stream_seconds(container, stream) * fps))
    total = min(count, int(fps * seconds)) if fps > 0 else count
    if total <= 0:
      raise VideoError(f"{path}: cannot tell the frame count (fps={fps}, frames={count})")
    wanted = frame_indices(total, num_frames)
    wanted_set = set(wanted.tolist())
    # Decode sequentially (one seek per frame costs more than decoding a 10 s GOP) and only
    # convert the frames that are kept.
    picked = {}
    last = None
    start_pts = None
    try:
      for k, frame in enumerate(container.decode(stream)):
        if start_pts is None and frame.pts is not None:
          start_pts = frame.pts
        if k in wanted_set:
          picked[k] = frame
        last = (k, frame)
        if k >= wanted[-1]:
          break
    except av.error.FFmpegError as e:
      if last is None:
        raise VideoError(f"{path}: video decoding failed ({e})") from e
    if last is None:
      raise VideoError(f"{path}: video stream holds no frames")
    jpegs, times, cache = [], [], {}
    for k in wanted:
      frame = picked.get(int(k), last[1])  # metadata overstated the count: use the last
      key = id(frame)
      if key not in cache:
        cache[key] = process_image(frame.to_image(), size, quality)
      jpegs.append(cache[key])
      pts = 0 if frame.pts is None else frame.pts - (start_pts or 0)
      times.append(float(pts * stream.time_base) if frame.pts is not None and stream.time_base
                   else float(k) / (fps or 1.0))
  return jpegs, np.asarray(times, np.float32)
