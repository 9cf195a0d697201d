"""Pictures: spectrograms, frame thumbnails and figures as PNG bytes (numpy, matplotlib, PIL).

The one place that draws. Spectrograms are log-mel [T, F] arrays, time frames x mel bins, as
the models take them, and are drawn as people read them: time from left to right in
seconds, low frequencies at the bottom.

  draw_spectrogram(ax, fbank)      onto a matplotlib Axes
  spectrogram_png(fbank)           a small PNG with its time axis (gallery thumbnails)
  image_png(rgb_uint8)             a frame as PNG (PIL)
  new_figure(w, h) / figure_png(fig) / axes_pixels(fig, ax)

Figures are `matplotlib.figure.Figure` on an Agg canvas, never pyplot, so nothing here
touches matplotlib's global state or needs a display. matplotlib and PIL are imported inside
the functions: importing this module (and `avmae_jax`) costs nothing.
"""

import io
from typing import Any, Optional, Sequence

import numpy as np

from avmae_jax.data import schema

FRAME_SHIFT_S = schema.FRAME_SHIFT_S  # the log-mel's 10 ms hop
FONT_SIZE = 7  # small figures (thumbnails, report panels) stay legible at this size


def new_figure(width_in: float, height_in: float, dpi: int = 100, nrows: int = 1,
               ncols: int = 1, squeeze: bool = True, **subplot_kw: Any):
  """(Figure on an Agg canvas, its Axes: one, or an array [nrows, ncols] as
  `Figure.subplots` squeezes it), laid out by matplotlib's constrained layout so that labels
  do not overlap. subplot_kw: more arguments of `Figure.subplots` (sharex, ...)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)
  return fig, axes


def figure_png(fig) -> bytes:
  """The figure as PNG bytes, at the figure's own size and dpi."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor="white")
  return buffer.getvalue()


def axes_pixels(fig, ax) -> np.ndarray:
  """The rendered RGB pixels [h, w, 3] of `ax`'s data area, top row first (as in the PNG):
  what a reader sees of the data, for checks of orientation and colours. The outermost
  pixel or two on each side hold the axes' frame line."""
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
  box = ax.get_window_extent()  # display pixels, origin at the bottom left
  height = rgb.shape[0]
  top, bottom = int(round(height - box.y1)), int(round(height - box.y0))
  return rgb[top:bottom, int(round(box.x0)):int(round(box.x1))].copy()


def _check_fbank(fbank) -> np.ndarray:
  fbank = np.asarray(fbank, np.float32)
  if fbank.ndim != 2 or not fbank.size:
    raise ValueError(f"a spectrogram is a log-mel [time frames, mel bins] array; got shape "
                     f"{fbank.shape}")
  return fbank


def draw_spectrogram(ax, fbank, frame_shift_s: float = FRAME_SHIFT_S,
                     title: Optional[str] = None, vmin: Optional[float] = None,
                     vmax: Optional[float] = None, cmap: str = "magma",
                     mask=None, mask_colour: Sequence[int] = (40, 80, 160)):
  """Draws log-mel `fbank` [T, F] on `ax`: time across (frame t at t * frame_shift_s
  seconds), mel bin 0 (the lowest frequencies) at the bottom, aspect auto. vmin/vmax: the
  colour scale (default the array's range). mask: optional [T, F] bool, drawn in
  `mask_colour` (RGB 0-255) over the spectrogram. Returns the spectrogram's AxesImage."""
  fbank = _check_fbank(fbank)
  num_frames, num_bins = fbank.shape
  # pixel t spans [t, t+1) frames; bin f is centred on f
  extent = (0.0, num_frames * frame_shift_s, -0.5, num_bins - 0.5)
  image = ax.imshow(fbank.T, origin="lower", aspect="auto", extent=extent, cmap=cmap,
                    vmin=vmin, vmax=vmax, interpolation="nearest")
  if mask is not None:
    mask = np.asarray(mask, bool)
    if mask.shape != fbank.shape:
      raise ValueError(f"mask shape {mask.shape} is not the spectrogram's {fbank.shape}")
    overlay = np.zeros(fbank.shape[::-1] + (4,), np.float32)
    overlay[..., :3] = np.asarray(mask_colour, np.float32) / 255.0
    overlay[..., 3] = mask.T
    ax.imshow(overlay, origin="lower", aspect="auto", extent=extent, interpolation="nearest")
  ax.set_xlabel("time (s)", fontsize=FONT_SIZE)
  ax.set_ylabel("mel bin", fontsize=FONT_SIZE)
  ax.tick_params(labelsize=FONT_SIZE)
  if title:
    ax.set_title(title, fontsize=FONT_SIZE + 1)
  return image


def spectrogram_png(fbank, frame_shift_s: float = FRAME_SHIFT_S, width_in: float = 4.0,
                    height_in: float = 1.6, dpi: int = 100, title: Optional[str] = None
                    ) -> bytes:
  """A PNG of one log-mel [T, F] with its time axis in seconds (a thumbnail: 400 x 160
  pixels by default)."""
  fig, ax = new_figure(width_in, height_in, dpi)
  draw_spectrogram(ax, fbank, frame_shift_s, title=title)
  return figure_png(fig)


def image_png(rgb_uint8, max_side: Optional[int] = None) -> bytes:
  """A PNG of an RGB image [H, W, 3] uint8, shrunk (aspect kept) so that its longer side
  is at most `max_side` pixels when given."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rgb = np.asarray(rgb_uint8)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"an image is [H, W, 3] uint8; got shape {rgb.shape}, dtype {rgb.dtype}")
  image = Image.fromarray(rgb)
  if max_side is not None:
    if max_side < 1:
      raise ValueError(f"max_side must be >= 1, got {max_side}")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
