"""Procedural audio-visual scenes whose sound matches what is seen, for demos and tests.

Each class is an object (shape + colour + kind of motion) with its own sound (timbre + pitch).
The object makes a sound event each time its motion "hits" (wall bounce, orbit passage, size
peak) and flashes brighter with the same envelope, so audio and video are synchronised.
Every attribute is shared by two classes (two red classes, two circle classes, two tone
classes...), so a model must combine cues; per clip the pitch, event rate, size, position,
speed, colour, background, a silent grey distractor and audio noise vary, so the task is
learnable but not trivial. Within a class the pitch follows the object's size (a larger
object sounds lower, as resonators do), so a single frame also tells clips of one class
apart: retrieval can beat the 1-in-(clips per class) ceiling of class-level matching.
Backgrounds are near-grey so that the saturated object, not the background, carries the
colour cue.

Examples go through the same feature code as real clips: the waveform through
`audio.clip_fbank`, the rendered frames through `video.process_image` (resize, crop, JPEG).
`write_video` renders a scene into a real video file (any container/codec PyAV writes), which
tests and the prepare benchmark use as generated input.
"""

import dataclasses
import os

import av
import numpy as np

from avmae_jax.data import audio
from avmae_jax.data import schema
from avmae_jax.data import video


@dataclasses.dataclass(frozen=True)
class SceneClass:
  name: str
  shape: str  # circle | square | triangle | ring
  colour: tuple[int, int, int]
  motion: str  # horizontal | vertical | orbit | pulse
  sound: str  # tone | buzz | chirp_up | chirp_down | noise
  freq: float  # Hz, the sound's characteristic frequency


_RED, _BLUE, _GREEN, _YELLOW = (220, 40, 40), (40, 70, 220), (40, 190, 60), (230, 210, 40)

CLASSES = (
    SceneClass("red_circle_tone", "circle", _RED, "horizontal", "tone", 440.0),
    SceneClass("blue_square_buzz", "square", _BLUE, "vertical", "buzz", 180.0),
    SceneClass("green_triangle_chirp_up", "triangle", _GREEN, "orbit", "chirp_up", 500.0),
    SceneClass("yellow_ring_noise", "ring", _YELLOW, "pulse", "noise", 2500.0),
    SceneClass("red_square_chirp_down", "square", _RED, "orbit", "chirp_down", 1200.0),
    SceneClass("blue_circle_noise", "circle", _BLUE, "pulse", "noise", 900.0),
    SceneClass("green_ring_tone", "ring", _GREEN, "horizontal", "tone", 1000.0),
    SceneClass("yellow_triangle_buzz", "triangle", _YELLOW, "vertical", "buzz", 320.0),
)
MAX_CLASSES = len(CLASSES)

# Rendered frame size before the shared resize/crop path (not square on purpose, so the
# crop does real work) and the frame rate the stored positions assume.
RENDER_WIDTH, RENDER_HEIGHT, RENDER_FPS = 320, 240, 25.0
_SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}


@dataclasses.dataclass(frozen=True)
class Scene:
  """One clip's random draw: everything needed to render its audio and frames."""
  label: int
  seconds: float
  rate: float  # events per second
  phase: float  # time of the first event, s
  freq: float
  size: float  # object radius as a fraction of the frame height
  centre: tuple[float, float]  # fractions of width, height
  amplitude: float  # motion amplitude, fraction of the frame height
  colour: tuple[float, float, float]
  background: tuple[float, float, float]
  gradient: float
  distractor: tuple[float, float, float, float]  # x0, y0, vx, vy (fractions, per second)
  snr_db: float
  hum_hz: float
  seed: int


def class_names(num_classes: int = MAX_CLASSES) -> list[str]:
  _check_num_classes(num_classes)
  return [c.name for c in CLASSES[:num_classes]]


def _check_num_classes(num_classes):
  if not 2 <= num_classes <= MAX_CLASSES:
    raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}.")


def draw_scene(seed: int, split: str, index: int, num_classes: int = MAX_CLASSES,
               seconds: float = 10.0) -> Scene:
  """Deterministic random scene number `index` of a split; labels cycle through the classes."""
  _check_num_classes(num_classes)
  rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 3), index])
  label = index % num_classes
  cls = CLASSES[label]
  rate = rng.uniform(0.8, 2.5)
  colour = np.clip(np.array(cls.colour) * rng.uniform(0.75, 1.15) + rng.normal(0, 12, 3), 0, 255)
  pitch = rng.uniform(-1.0, 1.0)  # +-0.4 octave around the class frequency; size follows
  grey = rng.uniform(30, 120)
  return Scene(
      label=label,
      seconds=seconds,
      rate=rate,
      phase=rng.uniform(0.05, 1.0 / rate),
      freq=cls.freq * 2.0 ** (0.4 * pitch),
      size=0.22 - 0.07 * pitch,
      centre=(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),
      amplitude=rng.uniform(0.12, 0.25),
      colour=tuple(colour),
      background=tuple(np.clip(grey + rng.normal(0, 8, 3), 0, 255)),
      gradient=rng.uniform(-20, 20),
      distractor=(rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(-0.1, 0.1),
                  rng.uniform(-0.1, 0.1)),
      snr_db=rng.uniform(6.0, 25.0),
      hum_hz=rng.uniform(50.0, 120.0),
      seed=int(rng.integers(2**31)),
  )


def _events_envelope(scene: Scene, t: np.ndarray, decay: float = 0.12) -> np.ndarray:
  """1 at each event, decaying exponentially until the next (the sound's and flash's shape)."""
  since = np.mod(t - np.float32(scene.phase), np.float32(1.0 / scene.rate))
  env = np.exp(since * np.float32(-1.0 / decay))
  return np.where(t < scene.phase, np.float32(0.0), env)


def synthesize_audio(scene: Scene, sample_rate: int = schema.SAMPLE_RATE) -> np.ndarray:
  """The scene's soundtrack, float32 mono in [-1, 1]."""
  cls = CLASSES[scene.label]
  rng = np.random.default_rng(scene.seed)
  n = int(round(scene.seconds * sample_rate))
  # float32 throughout: generation speed matters more than precision here.
  t = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
  env = _events_envelope(scene, t)
  f = scene.freq
  if cls.sound == "tone":
    src = np.sin(np.mod(np.float32(f) * t, np.float32(1.0)) * np.float32(2 * np.pi))
  elif cls.sound == "buzz":
    # Harmonics 1..6 with 1/k amplitudes, on a phase wrapped to one cycle so that float32
    # stays accurate over 10 s.
    phase = np.mod(np.float32(f) * t, np.float32(1.0)) * np.float32(2 * np.pi)
    src = sum(np.sin(np.float32(k) * phase) / np.float32(k) for k in range(1, 7))
  elif cls.sound in ("chirp_up", "chirp_down"):
    since = np.mod(t - np.float32(scene.phase), np.float32(1.0 / scene.rate))
    sweep = np.clip(since / 0.3, 0.0, 1.0)
    inst = f * (1.0 + 2.0 * sweep) if cls.sound == "chirp_up" else f * (3.0 - 2.0 * sweep)
    cycles = np.mod(np.cumsum(inst, dtype=np.float64) / sample_rate, 1.0)
    src = np.sin(np.float32(2 * np.pi) * cycles.astype(np.float32))
  else:  # band-limited noise around f
    spec = np.fft.rfft(rng.standard_normal(n, dtype=np.float32))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spec[(freqs < 0.75 * f) | (freqs > 1.25 * f)] = 0
    src = np.fft.irfft(spec, n)
    src /= np.abs(src).max() + 1e-9
  signal = src * env
  # Background: broadband noise at the scene's SNR plus a quiet mains-like hum.
  sig_rms = np.sqrt(np.mean(signal**2)) + 1e-9
  noise = rng.standard_normal(n, dtype=np.float32)
  noise *= sig_rms / (10 ** (scene.snr_db / 20)) / (np.sqrt(np.mean(noise**2)) + 1e-9)
  hum = 0.05 * sig_rms * np.sin(2 * np.pi * scene.hum_hz * t)
  wave = signal + noise + hum
  wave *= rng.uniform(0.2, 0.7) / (np.abs(wave).max() + 1e-9)
  return wave.astype(np.float32)


def _shape_mask(shape, xx, yy, cx, cy, r):
  dx, dy = xx - cx, yy - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "ring":
    d2 = dx * dx + dy * dy
    return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  # Upward triangle inscribed in the circle of radius r.
  return (dy <= 0.5 * r) & (dy >= -r + 1.732 * np.abs(dx))


def _draw(img, shape, cx, cy, r, colour):
  """Paints a shape into img in place, touching only its bounding box (rendering speed)."""
  h, w = img.shape[:2]
  x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
  y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
  if x0 >= x1 or y0 >= y1:
    return
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  img[y0:y1, x0:x1][_shape_mask(shape, xx, yy, cx, cy, r)] = colour


_BACKGROUNDS = {}


def _background(scene, width, height, variant):
  """Gradient background plus one of a few fixed noise fields (cached: rendering speed)."""
  key = (scene, width, height)
  if key not in _BACKGROUNDS:
    if len(_BACKGROUNDS) > 8:
      _BACKGROUNDS.clear()
    rng = np.random.default_rng(scene.seed)
    ramp = scene.gradient * (np.arange(height, dtype=np.float32)[:, None, None] / height - 0.5)
    base = np.asarray(scene.background, np.float32)[None, None, :] + ramp
    _BACKGROUNDS[key] = [
        np.clip(base + 6.0 * rng.standard_normal((height, width, 1), dtype=np.float32), 0, 255)
        for _ in range(2)
    ]
  return _BACKGROUNDS[key][variant % 2]


def render_frame(scene: Scene, t: float, width: int = RENDER_WIDTH,
                 height: int = RENDER_HEIGHT) -> np.ndarray:
  """The scene at time t (seconds), uint8 [height, width, 3]."""
  cls = CLASSES[scene.label]
  img = _background(scene, width, height, int(round(t * 25))).copy()
  # Events happen at phase + k / rate; motions are timed so that a hit falls on each event.
  u = (t - scene.phase) * scene.rate  # event count, fractional
  cx, cy = scene.centre[0] * width, scene.centre[1] * height
  amp = scene.amplitude * height
  r = scene.size * height
  tri = 2.0 * np.abs(np.mod(u, 2.0) - 1.0) - 1.0  # +-1 at integer u (the "hits")
  if cls.motion == "horizontal":
    cx += amp * tri
  elif cls.motion == "vertical":
    cy += amp * tri
  elif cls.motion == "orbit":
    cx += amp * np.cos(2 * np.pi * u)
    cy += amp * np.sin(2 * np.pi * u)
  else:  # pulse: largest at each event
    r *= 1.0 + 0.35 * np.cos(2 * np.pi * u)
  # Silent grey distractor, drifting and wrapping around.
  x0, y0, vx, vy = scene.distractor
  _draw(img, "square", np.mod(x0 + vx * t, 1.0) * width, np.mod(y0 + vy * t, 1.0) * height,
        0.07 * height, 128.0)
  flash = float(_events_envelope(scene, np.asarray([t]))[0])
  colour = np.asarray(scene.colour, np.float32) * (0.65 + 0.35 * flash) + 60.0 * flash
  _draw(img, cls.shape, cx, cy, r, np.minimum(colour, 255.0))
  return img.astype(np.uint8)


def scene_frame_times(num_frames: int, seconds: float = 10.0,
                      fps: float = RENDER_FPS) -> np.ndarray:
  """Times of the stored frames, as if the scene were a `fps` video read by `video.py`."""
  total = min(int(round(seconds * fps)), int(fps * video.REFERENCE_SECONDS))
  return (video.frame_indices(total, num_frames) / fps).astype(np.float32)


def make_example(seed: int, split: str, index: int, num_classes: int = MAX_CLASSES,
                 num_frames: int = schema.CAV_MAE_NUM_FRAMES, seconds: float = 10.0) -> dict:
  """One synthetic example in the schema.py form (frames as JPEG bytes)."""
  scene = draw_scene(seed, split, index, num_classes, seconds)
  times = scene_frame_times(num_frames, seconds)
  labels = np.zeros(num_classes, np.uint8)
  labels[scene.label] = 1
  return {
      schema.CLIP_ID: f"{split}_{index:06d}",
      schema.LABELS: labels,
      schema.FBANK: audio.clip_fbank(synthesize_audio(scene)).astype(np.float16),
      schema.FRAMES: [video.process_image(render_frame(scene, float(ti))) for ti in times],
      schema.FRAME_TIMES: times,
      schema.PATH: f"synthetic://seed={seed}/{split}/{index}",
  }


def make_indexed_example(args: tuple) -> tuple[int, dict]:
  """(seed, split, index, num_classes, num_frames, seconds) -> (index, example).

  Module-level and TensorFlow-free, so that worker processes start fast.
  """
  seed, split, index, num_classes, num_frames, seconds = args
  return index, make_example(seed, split, index, num_classes, num_frames, seconds)


def write_video(path: os.PathLike | str, scene: Scene | None = None, *,
                width: int = 640, height: int = 360, fps: int = 25,
                sample_rate: int = 44100, channels: int = 2,
                video_codec: str = "libx264", audio_codec: str | None = "aac",
                video_options: dict | None = None) -> Scene:
  """Renders a scene into a real video file with PyAV (test and benchmark input).

  Args:
    path: output file; the container follows its extension (.mp4, .mkv, .webm...).
    scene: what to render; a fixed default scene when None.
    width, height, fps: video geometry.
    sample_rate, channels: audio format (the soundtrack is rendered at 16 kHz and resampled).
    video_codec: e.g. libx264, libvpx, mpeg4.
    audio_codec: e.g. aac, libopus, flac, mp3; None writes no audio track.
    video_options: encoder options (x264 defaults to the fast `ultrafast` preset here).

  Returns:
    The rendered scene.
  """
  scene = scene or draw_scene(0, "train", 0, seconds=10.0)
  path = os.fspath(path)
  layout = {1: "mono", 2: "stereo"}[channels]
  if video_options is None:
    video_options = {"preset": "ultrafast"} if video_codec == "libx264" else {}
  with av.open(path, "w") as out:
    vs = out.add_stream(video_codec, rate=fps, options=video_options)
    vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
    astream = None
    if audio_codec:
      astream = out.add_stream(audio_codec, rate=sample_rate, layout=layout)
    num = int(round(scene.seconds * fps))
    for k in range(num):
      img = render_frame(scene, k / fps, width, height)
      for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in vs.encode(None):
      out.mux(packet)
    if astream is not None:
      wave = synthesize_audio(scene)
      resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
      src = np.ascontiguousarray(wave[None, :])
      chunk = 16000
      pts = 0
      for start in range(0, src.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(src[:, start:start + chunk], format="fltp",
                                           layout="mono")
        frame.sample_rate = schema.SAMPLE_RATE
        frame.pts = pts
        pts += frame.samples
        for rframe in resampler.resample(frame):
          if channels == 2:
            # A quieter second channel, so first-channel and down-mix decoding differ.
            data = rframe.to_ndarray()
            rframe = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(np.stack([data[0], 0.5 * data[0]])), format="fltp",
                layout="stereo")
            rframe.sample_rate = sample_rate
          rframe.pts = None
          for packet in astream.encode(rframe):
            out.mux(packet)
      for rframe in resampler.resample(None):
        rframe.pts = None
        for packet in astream.encode(rframe):
          out.mux(packet)
      for packet in astream.encode(None):
        out.mux(packet)
  return scene
