"""Tests for lco_mini.support.media: every fixture is generated in tmp_path (no binary files in the repo)."""

import importlib.util

import numpy as np
import pytest
import soundfile
from PIL import Image

from lco_mini.support.media import (
    MediaError,
    load_audio,
    load_image,
    load_video,
    modality_of,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixel(img, xy=(0, 0)):
    return img.getpixel(xy)


def save_gif(path, colours, size=(8, 6)):
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


# ----------------------------------------------------------------------------- images: modes -> RGB

def _image_in_mode(mode):
    """(image, file suffix or None for in-memory only, expected RGB)."""
    if mode == "RGB":
        return Image.new("RGB", (4, 3), (10, 200, 30)), ".png", (10, 200, 30)
    if mode == "RGBA":  # half-transparent red on white -> pink
        return Image.new("RGBA", (4, 3), (255, 0, 0, 128)), ".png", (255, 127, 127)
    if mode == "LA":  # fully transparent black -> white background shows
        return Image.new("LA", (4, 3), (0, 0)), ".png", WHITE
    if mode == "P":  # palette with the second entry transparent
        img = Image.new("P", (4, 3), 1)
        img.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
        img.putpixel((0, 0), 0)
        img.info["transparency"] = 1
        return img, ".png", WHITE  # checked at (1, 1); (0, 0) is opaque blue
    if mode == "CMYK":  # C=0 M=255 Y=255 K=0 is red
        return Image.new("CMYK", (4, 3), (0, 255, 255, 0)), ".tiff", RED
    if mode == "I;16":  # 16-bit grey, half scale: 32896 / 257 = 128
        return Image.fromarray(np.full((3, 4), 32896, dtype=np.uint16)), ".png", (128, 128, 128)
    if mode == "I":  # 32-bit int holding 16-bit data
        return Image.fromarray(np.full((3, 4), 65535, dtype=np.int32), mode="I"), ".tiff", WHITE
    if mode == "F":  # float in [0, 1]
        return Image.fromarray(np.full((3, 4), 0.5, dtype=np.float32), mode="F"), ".tiff", (128, 128, 128)
    if mode == "L":
        return Image.new("L", (4, 3), 77), ".png", (77, 77, 77)
    if mode == "1":
        return Image.new("1", (4, 3), 1), ".png", WHITE
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "L", "1"])
@pytest.mark.parametrize("from_file", [True, False])
def test_every_mode_becomes_rgb(tmp_path, mode, from_file):
    img, suffix, expected = _image_in_mode(mode)
    assert img.mode == mode
    if from_file:
        path = tmp_path / f"img{suffix}"
        img.save(path)
        with Image.open(path) as reopened:
            assert reopened.mode.startswith(mode[0])  # the file really holds that kind of mode
        img = path
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert pixel(out, (1, 1)) == pytest.approx(expected, abs=1)
    if mode == "P":
        assert pixel(out, (0, 0)) == BLUE


def test_already_open_image_is_not_modified():
    img = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    out = load_image(img)
    assert out is not img and img.mode == "RGBA" and pixel(out) == WHITE


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (0, 0, 10, 20))  # blue on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = np.asarray(out)[2, 10], np.asarray(out)[-3, 10]
    assert top[2] > 200 and top[0] < 60  # the left edge went to the top
    assert bottom[0] > 200 and bottom[2] < 60


def test_huge_photo_fits_the_pixel_budget(tmp_path):
    path = tmp_path / "dslr.jpg"
    Image.new("RGB", (6000, 4000), GREEN).save(path, quality=80)
    out = load_image(path, max_pixels=1024 * 1024)
    assert out.width * out.height <= 1024 * 1024
    assert out.width * out.height > 0.95 * 1024 * 1024  # not shrunk further than needed
    assert out.width / out.height == pytest.approx(1.5, rel=0.01)
    assert pixel(out, (100, 100)) == pytest.approx(GREEN, abs=3)


def test_tiny_image_is_upscaled_to_min_pixels(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), BLUE).save(path)
    assert load_image(path).size == (1, 1)
    out = load_image(path, min_pixels=64)
    assert out.size == (8, 8) and pixel(out, (4, 4)) == BLUE


# 40000 px > 2 x 150 x 150: Pillow raises; 40000 px within 1-2 x 199 x 199: Pillow only warns
@pytest.mark.parametrize("pixels", [150 * 150, 199 * 199])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, pixels):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(MediaError, match=r"bomb\.png: refused as a possible decompression bomb"):
        load_image(path)


def test_default_limit_accepts_a_24_megapixel_photo():
    assert 6000 * 4000 < Image.MAX_IMAGE_PIXELS  # the guard stays on, at Pillow's default


def test_corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    path.write_bytes(good.read_bytes()[:300])  # valid header, truncated data
    with pytest.raises(MediaError, match=r"broken\.png: not a readable image \(") as err:
        load_image(path)
    assert "\n" not in str(err.value)


def test_text_file_renamed_png(tmp_path):
    path = tmp_path / "photo.png"
    path.write_text("definitely not pixels\n")
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert str(err.value) == f"{path}: not a readable image (cannot identify image file)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(MediaError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="is a directory, not an image"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match=r"nope\.wav: no such file"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(MediaError, match=r"nope\.mp4: no such file"):
        load_video(tmp_path / "nope.mp4")


def test_animated_gif_as_image_gives_first_frame(tmp_path):
    out = load_image(save_gif(tmp_path / "anim.gif", [RED, GREEN, BLUE]))
    assert pixel(out) == RED


# ----------------------------------------------------------------------------- modality

def test_modality_of(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.WAV").write_bytes(b"")
    (tmp_path / "a.mp4").write_bytes(b"")
    assert modality_of(tmp_path / "a.png") == "image"
    assert modality_of(tmp_path / "a.WAV") == "audio"
    assert modality_of(tmp_path / "a.mp4") == "video"
    assert modality_of(tmp_path) == "video"
    assert modality_of(save_gif(tmp_path / "still.gif", [RED])) == "image"
    assert modality_of(save_gif(tmp_path / "anim.gif", [RED, BLUE])) == "video"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "still.webp", lossless=True)
    assert modality_of(tmp_path / "anim.webp") == "video"
    assert modality_of(tmp_path / "still.webp") == "image"


def test_modality_of_errors(tmp_path):
    (tmp_path / "notes.xyz").write_text("x")
    expected = r"notes\.xyz: unsupported file type '\.xyz'; supported: .*\.png.*\.wav.*\.mp4"
    with pytest.raises(MediaError, match=expected):
        modality_of(tmp_path / "notes.xyz")
    with pytest.raises(MediaError, match=r"ghost\.png: no such file"):
        modality_of(tmp_path / "ghost.png")




# ----------------------------------------------------------------------------- audio

def test_stereo_48k_wav_becomes_mono_16k(tmp_path):
    rate, seconds, freq = 48000, 1.0, 440.0
    t = np.arange(int(rate * seconds)) / rate
    left, right = 0.6 * np.sin(2 * np.pi * freq * t), 0.2 * np.sin(2 * np.pi * freq * t)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), rate, subtype="PCM_16")
    audio = load_audio(path, sampling_rate=16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * 16000 / len(audio)
    assert peak_hz == pytest.approx(freq, abs=2)
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)  # mean of 0.6 and 0.2


def test_flac_at_target_rate_is_read_as_is(tmp_path):
    samples = np.linspace(-0.5, 0.5, 800, dtype=np.float32)
    soundfile.write(tmp_path / "ramp.flac", samples, 16000, subtype="PCM_24")
    np.testing.assert_allclose(load_audio(tmp_path / "ramp.flac"), samples, atol=1e-6)


def test_audio_arrays():
    np.testing.assert_allclose(load_audio(np.array([0, 16384, -32768], dtype=np.int16)), [0, 0.5, -1])
    np.testing.assert_allclose(load_audio(np.array([128, 255], dtype=np.uint8)), [0, 127 / 128])
    stereo = np.stack([np.full(50, 0.5), np.full(50, -0.1)])  # (channels, samples), torchaudio's layout
    np.testing.assert_allclose(load_audio(stereo), np.full(50, 0.2), atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T), np.full(50, 0.2), atol=1e-7)  # (samples, channels)
    with pytest.raises(MediaError, match=r"<audio array>: float samples must lie in \[-1, 1\], max \|x\| is 3\b"):
        load_audio(np.array([0.0, 3.0]))
    with pytest.raises(MediaError, match="NaN"):
        load_audio(np.array([0.0, np.nan]))


def test_empty_and_corrupt_audio(tmp_path):
    soundfile.write(tmp_path / "silence.wav", np.zeros((0, 2)), 16000)
    with pytest.raises(MediaError, match=r"silence\.wav: empty audio \(0 samples\)"):
        load_audio(tmp_path / "silence.wav")
    with pytest.raises(MediaError, match=r"<audio array>: empty audio"):
        load_audio(np.zeros(0, dtype=np.float32))
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(MediaError, match=r"noise\.wav: not a readable audio file \("):
        load_audio(tmp_path / "noise.wav")


# ----------------------------------------------------------------------------- video

def test_animated_gif_frames_even_and_coloured(tmp_path):
    colours = [RED, GREEN, BLUE, WHITE, (0, 0, 0)]
    frames = load_video(save_gif(tmp_path / "clip.gif", colours), max_frames=16)
    assert len(frames) == 6  # 5 frames, the last duplicated to make pairs
    assert [pixel(f) for f in frames] == colours + [colours[-1]]
    assert all(f.mode == "RGB" and f.size == (8, 6) for f in frames)


def test_long_gif_is_subsampled_uniformly(tmp_path):
    colours = [(i * 20, 0, 255 - i * 20) for i in range(10)]
    frames = load_video(save_gif(tmp_path / "long.gif", colours), max_frames=4)
    assert [pixel(f) for f in frames] == [colours[i] for i in (0, 3, 6, 9)]
    assert len(load_video(tmp_path / "long.gif", max_frames=5)) == 4  # an odd budget rounds down


def test_gif_partial_frames_are_composited(tmp_path):
    # The second frame differs only on the left half: the GIF stores just that region,
    # and the decoder must paint it over the first frame.
    first = Image.new("RGB", (16, 8), RED)
    second = first.copy()
    second.paste(BLUE, (0, 0, 8, 8))
    first.save(tmp_path / "partial.gif", save_all=True, append_images=[second], duration=40)
    frames = load_video(tmp_path / "partial.gif")
    assert [pixel(frames[1], (2, 4)), pixel(frames[1], (12, 4))] == [BLUE, RED]


def test_single_frame_gif_as_video_has_two_frames(tmp_path):
    frames = load_video(save_gif(tmp_path / "still.gif", [GREEN]))
    assert len(frames) == 2 and all(pixel(f) == GREEN for f in frames)


def test_animated_webp(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "clip.webp", save_all=True, append_images=frames[1:], lossless=True, duration=40)
    out = load_video(tmp_path / "clip.webp", max_pixels=16)
    assert [pixel(f) for f in out] == [RED, GREEN, BLUE, BLUE]
    assert all(f.size == (4, 4) for f in out)


def test_folder_of_frames(tmp_path):
    colours = {2: RED, 10: GREEN, 1: BLUE}  # natural order 1, 2, 10 (not "1", "10", "2")
    for i, colour in colours.items():
        Image.new("RGB", (6, 4), colour).save(tmp_path / f"frame_{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    frames = load_video(tmp_path)
    assert [pixel(f) for f in frames] == [BLUE, RED, GREEN, GREEN]


def test_folder_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(MediaError, match="folder holds no image frames"):
        load_video(tmp_path)
    Image.new("RGB", (6, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    with pytest.raises(MediaError, match=r"frames differ in size \(4x4, 6x4\)"):
        load_video(tmp_path)


def test_not_a_video(tmp_path):
    soundfile.write(tmp_path / "song.wav", np.zeros(10), 16000)
    with pytest.raises(MediaError, match=r"song\.wav: not a video: expected a folder of frames or one of \.gif"):
        load_video(tmp_path / "song.wav")


def test_list_of_frames():
    frames = load_video([np.zeros((4, 4, 3), np.uint8), Image.new("L", (4, 4), 255), Image.new("RGB", (4, 4), RED)])
    assert [pixel(f) for f in frames] == [(0, 0, 0), WHITE, RED, RED]


def test_mp4_decoded_or_clear_install_hint(tmp_path):
    path = tmp_path / "clip.mp4"
    if importlib.util.find_spec("av") is not None:  # a decoder is installed: round-trip a real mp4
        import av

        colours = [RED, GREEN, BLUE]
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for colour in colours:
                frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), colour))
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        frames = load_video(path)
        assert len(frames) == 4
        for got, want in zip(frames, colours + [BLUE]):
            assert pixel(got, (16, 16)) == pytest.approx(want, abs=40)
    else:  # no PyAV to write a real mp4: a broken one still tells the decoder story
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
        if importlib.util.find_spec("torchcodec") is None:
            expected = r"clip\.mp4: decoding mp4 needs a video decoder: pip install av$"
        else:
            expected = r"clip\.mp4: not a readable video \("
        with pytest.raises(MediaError, match=expected):
            load_video(path)


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    """Qwen-VL processors raise on a ratio over 200:1; that must be a MediaError found by a data check."""
    Image.new("RGB", (10000, 1), RED).save(tmp_path / "line.png")
    with pytest.raises(MediaError, match=r"line\.png: 10000 x 1 pixels: an aspect ratio over 200:1"):
        load_image(tmp_path / "line.png")
    Image.new("RGB", (200, 1), RED).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (200, 1)
    with pytest.raises(MediaError, match=r"strip\.gif: 300 x 1 pixels"):
        load_video(save_gif(tmp_path / "strip.gif", [RED, BLUE], size=(300, 1)))


def test_pixel_budget_shrinks_a_big_rgba_png_on_white(tmp_path):
    """Shrunk before the RGB conversion (fewer full-size copies), with the same result."""
    img = Image.new("RGBA", (900, 300), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 450, 300))
    img.save(tmp_path / "half.png")
    out = load_image(tmp_path / "half.png", max_pixels=3000)
    assert out.mode == "RGB" and out.width * out.height <= 3000 and out.width / out.height == pytest.approx(3, rel=0.05)
    assert pixel(out, (2, 2)) == BLUE and pixel(out, (out.width - 2, 2)) == WHITE
