"""How the synthetic world looks and sounds: attribute values -> pixels, frames and waveforms.

lco_mini/tiny/world.py decides WHAT an item is (a combination of attribute values, its captions,
its split); this module decides how that combination is drawn or synthesised. Every
function takes an np.random.Generator that only jitters things (a few pixels, a phase, the
noise), never the meaning, and returns (media, geometry): geometry records where shapes were
drawn, for tests and plots.
"""
from __future__ import annotations

import itertools
import string
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOUR_RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245),
              "yellow": (240, 220, 40), "purple": (165, 60, 225), "orange": (250, 140, 20)}
SIZE_PX = {"small": 7, "large": 13}                       # half-width of a one-shape scene's shape
POSITION_XY = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
PITCH_HZ = {"low": 200.0, "mid": 600.0, "high": 1800.0}   # a factor 3 apart: far apart on a mel axis
CONTOURS = {"rising": 1, "falling": -1, "flat": 0}        # sweep f0/CONTOUR_SWEEP -> f0*CONTOUR_SWEEP (or reverse)
CONTOUR_SWEEP = 2.0  # two octaves in all; at 1.4 (one octave) the tiny model captioned contours at chance
RHYTHMS = {"steady": [(0.05, 0.95)],                      # (start, end) seconds where the sound is on
           "pulsing": [(0.05 + 0.115 * i, 0.11 + 0.115 * i) for i in range(8)],
           "twice": [(0.05, 0.40), (0.60, 0.95)],
           "thrice": [(0.05, 0.28), (0.38, 0.61), (0.71, 0.94)]}
IMAGE_SIZE, N_FRAMES, SAMPLE_RATE = 64, 4, 16000
# A document is one row of four 16 x 16 cells: one merged vision token each (patch 8 x merge 2), so
# each digit is one token the language model reads in order. With glyphs cut across tokens
# (64 x 32 pages, +-3 px) 2500 documents of pretraining taught the tiny model no reading at all.
DOC_SIZE, DOC_CELL, GLYPH_SCALE = (64, 16), 16, 2
BACKGROUND = (24, 24, 24)
ALIEN_SEED = 1234


def _draw_shape(draw, shape, rgb, cx, cy, r):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:  # cross: two bars, a third of the size thick
        w = max(2, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)


def _canvas(shapes):
    """[(shape, rgb, cx, cy, r)] -> 64 x 64 RGB image (~0.1 ms: Pillow draws, no anti-aliasing)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for shape in shapes:
        _draw_shape(ImageDraw.Draw(image), *shape)
    return image


def _inside(x, r):
    return int(np.clip(x, r, IMAGE_SIZE - 1 - r))


def render_image(a, rng):
    """Shapes jitter by a few pixels (and +-1 px in size) so a combination is not one fixed picture."""
    if a["kind"] == "one":
        r = SIZE_PX[a["size"]] + int(rng.integers(-1, 2))
        x, y = np.array(POSITION_XY[a["position"]]) + rng.integers(-3, 4, size=2)
        objects = [(a["shape"], COLOUR_RGB[a["colour"]], _inside(x, r), _inside(y, r), r)]
    else:  # first object left, second right, never overlapping
        (r1, r2), (dx1, dx2), (dy1, dy2) = 9 + rng.integers(-1, 2, 2), rng.integers(-2, 3, 2), rng.integers(-3, 4, 2)
        objects = [(a["shape"], COLOUR_RGB[a["colour"]], 18 + int(dx1), 32 + int(dy1), int(r1)),
                   (a["shape2"], COLOUR_RGB[a["colour2"]], 46 + int(dx2), 32 + int(dy2), int(r2))]
    return _canvas(objects), {"centers": [(x, y) for *_, x, y, _ in objects], "radii": [o[-1] for o in objects]}


def render_video(a, rng):
    dx, dy = rng.integers(-3, 4, size=2)
    frames, geometry = [], {"centers": [], "radii": [], "colours": []}
    for t in np.linspace(0.0, 1.0, N_FRAMES):
        x, y, r = 32, 32, 9
        if a["motion"] in ("rightward", "leftward"):
            x = 12 + 40 * (t if a["motion"] == "rightward" else 1 - t)
        elif a["motion"] in ("up", "down"):
            y = 12 + 40 * (t if a["motion"] == "down" else 1 - t)
        elif a["motion"] in ("grow", "shrink"):
            r = 5 + 12 * (t if a["motion"] == "grow" else 1 - t)
        else:
            r = 12
        start, end = np.array(COLOUR_RGB[a["colour"]]), np.array(COLOUR_RGB[a.get("colour2", a["colour"])])
        rgb = tuple(int(v) for v in np.rint((1 - t) * start + t * end))
        r = int(round(r))
        x, y = _inside(round(x) + dx, r), _inside(round(y) + dy, r)
        frames.append(_canvas([(a["shape"], rgb, x, y, r)]))
        for name, value in (("centers", (x, y)), ("radii", r), ("colours", rgb)):
            geometry[name].append(value)
    return frames, geometry


@lru_cache(maxsize=None)
def _envelope(rhythm):
    """0/1 on-off pattern smoothed by a 10 ms Hann window (no clicks at the edges)."""
    env = np.zeros(SAMPLE_RATE)
    for start, end in RHYTHMS[rhythm]:
        env[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)] = 1.0
    window = np.hanning(SAMPLE_RATE // 100)
    return np.convolve(env, window / window.sum(), mode="same")


def render_audio(a, rng):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    f0 = PITCH_HZ[a["pitch"]] * (1 + 0.03 * rng.uniform(-1, 1))
    freq = f0 * CONTOUR_SWEEP ** (CONTOURS[a["contour"]] * (2 * t - 1))        # geometric sweep around f0
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
    if a["timbre"] == "whistle":
        tone = np.sin(phase)
    elif a["timbre"] == "buzz":   # band-limited square wave: odd harmonics 1/k below Nyquist
        ks = range(1, int(SAMPLE_RATE / 2 / freq.max()) + 1, 2)
        tone = sum(np.sin(k * phase) / k for k in ks)
    else:                         # hiss: noise low-passed to 60 Hz, shifted up to f(t) by ring modulation
        spectrum = np.fft.rfft(rng.standard_normal(SAMPLE_RATE))
        spectrum[61:] = 0                                          # rfft bin i = i Hz for a 1 s signal
        tone = np.fft.irfft(spectrum, SAMPLE_RATE) * np.sin(phase)
    wave = tone * _envelope(a["rhythm"])
    wave = 0.5 * wave / np.abs(wave).max() + 0.002 * rng.standard_normal(SAMPLE_RATE)
    return wave.astype(np.float32), {}


@lru_cache(maxsize=None)
def _latin_glyphs():
    """digit -> 7 x 5 boolean glyph, cut from Pillow's embedded bitmap font (identical pixels everywhere)."""
    font = ImageFont.load_default_imagefont()
    glyphs = {}
    for digit in string.digits:
        small = Image.new("L", font.getbbox(digit)[2:], 0)
        ImageDraw.Draw(small).text((0, 0), digit, font=font, fill=255)
        glyphs[digit] = np.array(small)[2:9, :5] > 127   # every digit's ink lies in rows 2-8, columns 0-4
    return glyphs


@lru_cache(maxsize=None)
def _alien_glyphs():
    """digit -> 7 x 5 glyph of the invented script: three random strokes (+ maybe a dot), seeded
    by the digit, all distinct from each other and from the Latin digits."""
    glyphs, seen = {}, {g.tobytes() for g in _latin_glyphs().values()}
    for digit in string.digits:
        for attempt in itertools.count():
            rng = np.random.default_rng([ALIEN_SEED, ord(digit), attempt])
            glyph = np.zeros((7, 5), bool)
            for (y0, x0), (y1, x1) in rng.integers(0, [7, 5], size=(3, 2, 2)):
                steps = max(abs(y1 - y0), abs(x1 - x0)) + 1
                line = np.rint(np.linspace([y0, x0], [y1, x1], steps)).astype(int)
                glyph[line[:, 0], line[:, 1]] = True
            if rng.random() < 0.5:
                glyph[tuple(rng.integers(0, [7, 5]))] = True
            if glyph.sum() >= 7 and glyph.tobytes() not in seen:
                break
        glyphs[digit] = glyph
        seen.add(glyph.tobytes())
    return glyphs


def glyphs(script):
    """The 7 x 5 glyph of each digit in a script ("latin" or "alien")."""
    return _latin_glyphs() if script == "latin" else _alien_glyphs()


def render_document(a, rng, script):
    """A number, black on white, one glyph (x2: 14 x 10 px) per 16-px cell. The number starts in the
    first or second cell, and each glyph moves by a pixel: where it is never changes what it says."""
    (width, height), number = DOC_SIZE, a["number"]
    page = np.full((height, width, 3), 255, np.uint8)
    first = int(rng.integers(0, width // DOC_CELL - len(number) + 1))
    y = (height - 7 * GLYPH_SCALE) // 2 + int(rng.integers(-1, 2))
    offsets = []
    for i, digit in enumerate(number):
        ink = np.kron(glyphs(script)[digit], np.ones((GLYPH_SCALE, GLYPH_SCALE), bool))
        x = (first + i) * DOC_CELL + (DOC_CELL - ink.shape[1]) // 2 + int(rng.integers(-1, 2))
        page[y:y + ink.shape[0], x:x + ink.shape[1]][ink] = 0
        offsets.append((x, y))
    return Image.fromarray(page), {"offsets": offsets}
