"""Decoding inputs: turn the files a user hands us into what a multimodal model expects.

An MLLM's processor is strict about its inputs. Every normalisation below
exists because real files are messier than what the processor accepts:

* **Images -> RGB.** Vision towers are trained on 3-channel RGB. Files come as
  RGBA, palettes with a transparent colour, CMYK JPEGs, 16-bit grey PNGs,
  float TIFFs, 1-bit scans... Transparent pixels are composited on *white*
  (what a viewer shows; dropping alpha would expose whatever colour the
  transparent pixels happen to store, often black). High-bit-depth images are
  scaled down to 0..255 rather than clipped, or a 16-bit photo would be white.
* **EXIF orientation applied.** Phones store pixels sideways plus a tag saying
  "rotate me"; a model that ignores the tag sees a sideways photo.
* **A pixel budget.** A 6000 x 4000 photo is 24 MP; the processor would shrink
  it anyway, so we shrink it first (backbone.bound_items passes the processor's budget,
  embed.py a generous one before the model is known; JPEGs are even *decoded* small, via
  ``Image.draft``). Pillow's decompression-bomb guard stays on: a file whose
  header claims more than ``Image.MAX_IMAGE_PIXELS`` (89 MP by default, well
  above any camera photo) is refused instead of exhausting memory.
* **Audio -> float32 mono at one sample rate.** Audio encoders (Whisper-style)
  take a log-mel spectrogram computed at a fixed rate (16 kHz for Qwen2.5-Omni);
  a 48 kHz file read as if it were 16 kHz would sound three times slower.
  Channels are averaged: the encoder has one input channel.
* **Video -> an even number of RGB frames.** Qwen's video processor groups
  frames in pairs (temporal_patch_size = 2), so we subsample uniformly to at
  most ``max_frames`` and duplicate the last frame when the count is odd.

Animated GIF/WebP: ``modality_of`` opens the header and calls a file with more
than one frame a video. ``load_image`` on an animated file takes its first
frame (the caller asked for an image); ``load_video`` on a one-frame file
repeats it to make the pair the video processor needs.

Every user mistake raises ``MediaError`` (a ``ValueError``) with a one-line
message naming the input and what is wrong, so a CLI can print it as is.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg") + ((".mp3",) if "MP3" in soundfile.available_formats() else ())
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm")
ANIMATABLE_EXTENSIONS = (".gif", ".webp")  # image or video, depending on the frame count
ORIENTATION_TAG = 0x0112  # EXIF "Orientation": how the stored pixels must be turned to stand upright
# Qwen2-VL-family vision processors (smart_resize) refuse an image whose long side is more than
# 200 x its short side. Checked here, from the header, so a data check finds it before training.
MAX_ASPECT_RATIO = 200
RESAMPLE_FIRST_MODES = ("RGB", "RGBA", "L", "LA")  # modes Pillow resamples well (P, 1 would be nearest)


class MediaError(ValueError):
    """A user-facing input problem; str(error) is one line: '<input>: <what is wrong>'."""

    def __init__(self, source, problem: str):
        super().__init__(f"{source}: {' '.join(str(problem).split())}")  # collapse newlines


def modality_of(path) -> str:
    """'image' | 'audio' | 'video', from the extension (and the frame count for gif/webp)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "no such file or directory")
    if path.is_dir():
        return "video"  # a folder of frames; load_video checks that it holds any
    _check_regular(path)
    suffix = path.suffix.lower()
    if suffix in ANIMATABLE_EXTENSIONS:
        with _open_image(path) as img:  # reads only the header (and, for GIF, scans the frames)
            return "video" if getattr(img, "n_frames", 1) > 1 else "image"
    for modality, extensions in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS), ("video", VIDEO_EXTENSIONS)):
        if suffix in extensions:
            return modality
    supported = " ".join(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)
    kind = suffix or "(no extension)"
    raise MediaError(path, f"unsupported file type {kind!r}; supported: {supported} or a folder of frames")


def probe(path) -> str:
    """The modality of a file or folder of frames, checked from its header alone (no pixels or
    samples are decoded): what a command line checks for every input before loading a model."""
    modality = modality_of(path)
    path = Path(path)
    if modality == "image":
        with _open_image(path) as img:
            _check_aspect(img.size, path)
    elif modality == "audio":
        audio_seconds(path)
    elif path.is_dir():
        _frame_files(path)
    return modality


# Texts are cut to this many tokens (the official code truncates training text at 650), the same
# in training, evaluation and embed.py: one 1 MB text would otherwise need tens of GB of activations.
MAX_TEXT_TOKENS = 650


# ----------------------------------------------------------------------------- images

def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise MediaError(path, "no such file or directory")
    if path.is_dir():
        raise MediaError(path, f"is a directory, not {what}")
    _check_regular(path)


def _check_regular(path: Path) -> None:
    """A FIFO, a socket or a device would block a read forever, or cannot be read twice (a pipe:
    the header check reads it once): only regular files (and folders of frames) are inputs."""
    if not path.is_file():
        raise MediaError(path, "not a regular file (a pipe, socket or device); save it to a file first")


def _open_image(path: Path) -> Image.Image:
    """Image.open with every failure (and a decompression bomb) turned into a MediaError."""
    _check_file(path, "an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and 2x that, and raises above; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(path, f"refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise MediaError(path, "not a readable image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(path, f"not a readable image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (always a new image)."""
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode), mode="L").convert("RGB")
    return img.convert("RGB")  # RGB (copy), L, 1, P, CMYK, YCbCr, ...


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a wide type mapped onto 0..255.

    I;16 is 0..65535. Mode I (32-bit) is how Pillow opens many 16-bit files, so
    values above 255 are read as 16-bit too. Mode F is taken as 0..1 if it fits
    there, else as 0..255.
    """
    pixels = pixels.astype(np.float64)
    peak = pixels.max(initial=0.0)
    if mode.startswith("I;16") or (mode == "I" and peak > 255):
        pixels = pixels / 257.0  # 65535 / 257 = 255
    elif mode == "F" and peak <= 1.0:
        pixels = pixels * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _fit_size(width: int, height: int, max_pixels, min_pixels) -> tuple[int, int]:
    """The size with the same aspect ratio whose area lies within [min_pixels, max_pixels]."""
    area = width * height
    if max_pixels is not None and area > max_pixels:
        scale = (max_pixels / area) ** 0.5
        return max(1, int(width * scale)), max(1, int(height * scale))  # round down: stay under
    if min_pixels is not None and area < min_pixels:
        scale = (min_pixels / area) ** 0.5
        return int(np.ceil(width * scale)), int(np.ceil(height * scale))  # round up: reach it
    return width, height


def _check_aspect(size: tuple[int, int], source) -> None:
    long_side, short_side = max(size), min(size)
    if short_side == 0 or long_side / short_side > MAX_ASPECT_RATIO:
        raise MediaError(source, f"{size[0]} x {size[1]} pixels: an aspect ratio over {MAX_ASPECT_RATIO}:1, "
                                 "which Qwen-VL-family vision processors refuse; crop or pad it")


def _resize_to_budget(img: Image.Image, max_pixels, min_pixels) -> Image.Image:
    size = _fit_size(img.width, img.height, max_pixels, min_pixels)
    if size == img.size:
        return img
    if size[0] * size[1] < img.width * img.height:
        # LANCZOS when shrinking (sharp, little aliasing), after an integer reduce() (a box filter
        # that is fast on a huge image; a gap of 3 is indistinguishable from LANCZOS alone).
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize(size, Image.Resampling.BICUBIC)  # BICUBIC when enlarging (no ringing)


def load_image(path_or_image, max_pixels=None, min_pixels=None) -> Image.Image:
    """An RGB PIL image, upright (EXIF), with at most max_pixels / at least min_pixels pixels."""
    if isinstance(path_or_image, Image.Image):
        return _normalise_image(path_or_image, "<PIL image>", max_pixels, min_pixels)
    path = Path(path_or_image)
    with _open_image(path) as img:
        if max_pixels is not None and img.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients, never
            # below the target size: a 24 MP photo never exists in memory at full size.
            img.draft(None, _fit_size(img.width, img.height, max_pixels, None))
        return _normalise_image(img, path, max_pixels, min_pixels)


def _normalise_image(img: Image.Image, source, max_pixels, min_pixels) -> Image.Image:
    _check_aspect(img.size, source)  # the header's size: nothing decoded yet
    try:
        img.load()  # decoding happens here: truncated / corrupt data fails here
        if img.getexif().get(ORIENTATION_TAG, 1) != 1:  # 1 = upright; skip the copy otherwise
            img = ImageOps.exif_transpose(img)
        if img.mode in RESAMPLE_FIRST_MODES and max_pixels is not None and img.width * img.height > max_pixels:
            img = _resize_to_budget(img, max_pixels, None)  # shrink before the RGB copies, not after
        img = _to_rgb(img)  # always a new image: the caller's image or the file is left alone
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(source, f"not a readable image ({e})") from None
    return _resize_to_budget(img, max_pixels, min_pixels)


# ----------------------------------------------------------------------------- audio

def load_audio(path_or_array, sampling_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Float32 mono samples in [-1, 1] at `sampling_rate` Hz; of a file, at most its first
    `max_seconds` (only those frames are read: a two-hour recording costs what its window costs).

    A numpy array is taken as already at `sampling_rate`. A 2-D array holds
    channels on its shorter axis: (samples, channels), as soundfile returns, or
    (channels, samples), as torchaudio does. Integer arrays are scaled by their
    type's range; float arrays must already lie in [-1, 1].
    """
    if isinstance(path_or_array, np.ndarray):
        source, samples, rate = "<audio array>", _array_to_float(path_or_array), sampling_rate
        if samples.ndim == 2 and samples.size:
            samples = samples.mean(axis=1 if samples.shape[1] <= samples.shape[0] else 0)
    else:
        source = Path(path_or_array)
        _check_file(source, "an audio file")
        try:
            with open(source, "rb") as f:  # a file object: libsndfile cannot open a non-UTF-8 file name
                with soundfile.SoundFile(f) as sound:
                    frames = -1 if max_seconds is None else int(np.ceil(max_seconds * sound.samplerate))
                    samples, rate = sound.read(frames, dtype="float32", always_2d=True), sound.samplerate
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise MediaError(source, f"not a readable audio file ({e})") from None
        samples = samples.mean(axis=1)  # mono: the average of the channels
    if samples.ndim != 1:
        raise MediaError(source, f"expected 1-D or 2-D audio, got shape {samples.shape}")
    if samples.size == 0:
        raise MediaError(source, "empty audio (0 samples)")
    if not np.isfinite(samples).all():
        raise MediaError(source, "audio contains NaN or infinite samples")
    if rate != sampling_rate:
        import torch  # lazily: importing torchaudio costs a second, and only resampling needs it
        import torchaudio.functional

        samples = torchaudio.functional.resample(torch.from_numpy(samples), rate, sampling_rate).numpy()
    # The resampling filter can overshoot a full-scale signal by a hair: clip that back.
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def audio_seconds(path) -> float:
    """The length of an audio file, from its header alone."""
    source = Path(path)
    _check_file(source, "an audio file")
    try:
        with open(source, "rb") as f:
            return soundfile.info(f).duration
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(source, f"not a readable audio file ({e})") from None


def _array_to_float(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        half_range = 2.0 ** (np.iinfo(array.dtype).bits - 1)  # 32768 for int16
        zero = half_range if np.issubdtype(array.dtype, np.unsignedinteger) else 0.0  # uint8 silence is 128
        return ((array.astype(np.float64) - zero) / half_range).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise MediaError("<audio array>", f"expected a numeric array, got dtype {array.dtype}")
    peak = float(np.abs(array).max(initial=0.0))
    if peak > 1.0 + 1e-6:
        raise MediaError("<audio array>", f"float samples must lie in [-1, 1], max |x| is {peak:.3g}; scale it first")
    return array.astype(np.float32)


# ----------------------------------------------------------------------------- video

def load_video(path_or_frames, max_frames: int = 16, max_pixels=None) -> list[Image.Image]:
    """An even number (2..max_frames) of same-sized RGB frames, sampled uniformly over the video.

    Accepts an animated GIF/WebP, a folder of image frames, an mp4/mov/avi/mkv/webm
    (needs PyAV or torchcodec), or a list of PIL images / HxWx3 uint8 arrays.
    """
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2 (frames go in pairs), got {max_frames}")
    max_frames -= max_frames % 2  # an odd budget could not hold an even count after padding
    if isinstance(path_or_frames, (list, tuple)):
        source = "<frames>"
        frames = [load_image(Image.fromarray(f) if isinstance(f, np.ndarray) else f)
                  for f in _pick(list(path_or_frames), max_frames)]
    else:
        source = Path(path_or_frames)
        if source.is_dir():
            frames = [load_image(p) for p in _pick(_frame_files(source), max_frames)]
        elif source.suffix.lower() in ANIMATABLE_EXTENSIONS:
            frames = _animated_frames(source, max_frames)
        elif source.suffix.lower() in VIDEO_EXTENSIONS:
            frames = _decode_video_file(source, max_frames)
        else:
            _check_file(source, "a video")
            expected = " ".join(ANIMATABLE_EXTENSIONS + VIDEO_EXTENSIONS)
            raise MediaError(source, f"not a video: expected a folder of frames or one of {expected}")
    if not frames:
        raise MediaError(source, "video has no frames")
    if any(f.size != frames[0].size for f in frames):
        sizes = sorted({f"{f.width}x{f.height}" for f in frames})
        raise MediaError(source, f"frames differ in size ({', '.join(sizes)}): a video's frames must share one size")
    _check_aspect(frames[0].size, source)
    frames = [_resize_to_budget(f, max_pixels, None) for f in frames]
    if len(frames) % 2:
        frames.append(frames[-1].copy())  # temporal_patch_size = 2: frames are encoded in pairs
    return frames


# modality -> its decoder with default settings, for callers that dispatch on modality_of()
LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


def _pick(items: list, max_count: int) -> list:
    """At most max_count items, evenly spread from the first to the last."""
    if len(items) <= max_count:
        return items
    indices = np.rint(np.linspace(0, len(items) - 1, max_count)).astype(int)
    return [items[i] for i in indices]


def _natural_key(path: Path):
    """frame_2.png sorts before frame_10.png (plain string order would put it after)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise MediaError(folder, f"folder holds no image frames (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=_natural_key)


def _animated_frames(path: Path, max_frames: int) -> list[Image.Image]:
    """Frames of a GIF/WebP, fully composited: iterating in order lets Pillow apply
    each frame's disposal method and paste partial frames onto the previous canvas."""
    with _open_image(path) as img:
        wanted = set(_pick(list(range(getattr(img, "n_frames", 1))), max_frames))
        try:
            return [_to_rgb(frame) for i, frame in enumerate(ImageSequence.Iterator(img)) if i in wanted]
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(path, f"not a readable animation ({e})") from None


def _decode_video_file(path: Path, max_frames: int) -> list[Image.Image]:
    """mp4 & co. need an FFmpeg binding; use whichever is installed."""
    _check_file(path, "a video")
    for decode in (_decode_with_av, _decode_with_torchcodec):
        try:
            return decode(path, max_frames)
        except ImportError:
            continue  # this decoder is not installed: try the next
        except MediaError:
            raise
        except Exception as e:  # the decoder is there but the file is not a readable video
            raise MediaError(path, f"not a readable video ({type(e).__name__}: {e})") from None
    kind = path.suffix.lower().lstrip(".")
    raise MediaError(path, f"decoding {kind} needs a video decoder: pip install av")


def _decode_with_av(path: Path, max_frames: int) -> list[Image.Image]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:  # the container knows its length: keep only the frames we need
            wanted = set(_pick(list(range(stream.frames)), max_frames))
            frames = [f.to_image() for i, f in enumerate(container.decode(stream)) if i in wanted]
        else:  # unknown length (some containers): decode all, then pick
            frames = _pick([f.to_image() for f in container.decode(stream)], max_frames)
    return frames


def _decode_with_torchcodec(path: Path, max_frames: int) -> list[Image.Image]:
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # installed without its FFmpeg libraries fails at import
        raise ImportError(str(e)) from e
    decoder = VideoDecoder(str(path), dimension_order="NHWC")
    indices = _pick(list(range(len(decoder))), max_frames)
    batch = decoder.get_frames_at(indices=indices).data  # (frames, H, W, 3) uint8
    return [Image.fromarray(frame.numpy()) for frame in batch]
