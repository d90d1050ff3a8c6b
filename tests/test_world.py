"""Tests for the synthetic world: determinism, held-out split, captions, and what each rendering shows."""
import json
import os

import numpy as np
import pytest
import soundfile
from PIL import Image

from lco_mini.tiny import render, world

KINDS = [("image", "latin"), ("video", "latin"), ("audio", "latin"), ("document", "latin"),
         ("document", "alien"), ("text", "latin")]


def _media_bytes(item):
    media = item.media if isinstance(item.media, list) else [item.media]
    return [np.asarray(m).tobytes() if m is not None else b"" for m in media]


@pytest.mark.parametrize("modality,script", KINDS)
def test_same_seed_same_items_different_seed_different(modality, script):
    a = world.items(modality, "train", 6, seed=3, script=script)
    b = world.items(modality, "train", 6, seed=3, script=script)
    c = world.items(modality, "train", 6, seed=4, script=script)
    assert [_media_bytes(x) for x in a] == [_media_bytes(x) for x in b]
    assert [(x.captions, x.negative, x.attributes, x.script) for x in a] == \
           [(x.captions, x.negative, x.attributes, x.script) for x in b]
    assert [x.captions for x in a] != [x.captions for x in c]
    if modality != "text":
        assert [_media_bytes(x) for x in a] != [_media_bytes(x) for x in c]
    assert all(x.modality == modality and len(x.captions) >= 3 for x in a)


def test_render_seed_moves_things_but_keeps_meaning():
    attrs = dict(kind="one", colour="red", shape="square", size="large", position="center")
    images = [np.array(world.render_item("image", attrs, seed)[0]) for seed in range(6)]
    assert len({im.tobytes() for im in images}) > 1
    assert all((im[32, 32] == world.COLOUR_RGB["red"]).all() for im in images)


@pytest.mark.parametrize("modality", world.CAPTIONED)
def test_heldout_combinations_never_in_train(modality):
    train, heldout = world.combinations(modality, "train"), world.combinations(modality, "heldout")
    assert not any(world.is_heldout(modality, a) for a in train)
    assert all(world.is_heldout(modality, a) for a in heldout)
    assert len(train) + len(heldout) == len(world._all_combinations(modality))
    assert 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.35
    # every attribute value still occurs in training, only the combination is new (for numbers: digits)
    for name in {k for a in heldout for k in a} - {"number"}:
        assert {a[name] for a in heldout if name in a} <= {a[name] for a in train if name in a}
    drawn = world.items(modality, "train", 2 * len(train), seed=1)
    assert {world._key(x.attributes) for x in drawn} == {world._key(a) for a in train}


def test_heldout_pairs_as_specified():
    pairs = lambda m, s: {(a["colour"], a["shape"]) for a in world.combinations(m, s)}
    assert pairs("image", "train").isdisjoint(world.HELDOUT_COLOUR_SHAPE)
    assert pairs("video", "train").isdisjoint(world.HELDOUT_COLOUR_SHAPE)
    assert {(a["pitch"], a["rhythm"]) for a in world.combinations("audio", "train")}.isdisjoint(
        world.HELDOUT_PITCH_RHYTHM)
    train_numbers = {a["number"] for a in world.combinations("document", "train")}
    assert train_numbers.isdisjoint(world.HELDOUT_NUMBERS) and len(world.HELDOUT_NUMBERS) == 180
    # every digit at every position is read in training: a held-out number is a new combination
    for position in range(3):
        digits = {n[position] for n in train_numbers}
        assert digits == set("123456789" if position == 0 else "0123456789")


@pytest.mark.parametrize("modality", world.MODALITIES)
def test_heldout_draws_have_distinct_canonical_captions(modality):
    n = world.n_combinations(modality, "heldout")
    if modality == "image":
        n = 60   # rendering all 212 is fine too, this keeps the test fast
    drawn = world.items(modality, "heldout", n, seed=0)
    assert len({x.captions[0] for x in drawn}) == n
    assert len(world.items(modality, "heldout", world.n_combinations(modality, "heldout") + 3)) == \
        world.n_combinations(modality, "heldout") + 3   # beyond that it cycles


@pytest.mark.parametrize("modality", world.CAPTIONED)
def test_captions_identify_their_combination(modality):
    combos = world._all_combinations(modality)
    for k in range(world.N_PARAPHRASES):
        assert len({world.caption(modality, a, k) for a in combos}) == len(combos)
    for a in combos:
        assert len({world.caption(modality, a, k) for k in range(world.N_PARAPHRASES)}) == world.N_PARAPHRASES


def test_captions_worked_examples():
    assert world.caption("image", dict(kind="one", colour="orange", shape="circle", size="small",
                                       position="left")) == "a small orange circle on the left"
    two = dict(kind="two", colour="red", shape="circle", colour2="blue", shape2="square")
    assert world.caption("image", two, 1) == "an azure box at the right side and a crimson disc at the left side"
    assert world.caption("video", dict(colour="red", shape="cross", motion="recolour", colour2="blue")) == \
        "a cross changing from red to blue"
    assert world.caption("audio", dict(pitch="low", timbre="hiss", rhythm="twice", contour="rising"), 2) == \
        "beeping twice: a rising low hiss"


def test_every_caption_and_negative_is_in_corpus():
    corpus = world.corpus()
    assert len(corpus) == len(set(corpus)) and 3000 < len(corpus) < 50_000
    assert corpus == world.corpus()
    strings = set(corpus)
    tokens = {t for s in corpus for t in s.split()}
    for modality, script in KINDS:
        for split in world.SPLITS:
            for x in world.items(modality, split, 20, seed=5, script=script):
                assert set(x.captions) <= strings and x.negative in strings
    for triple in world.text_pairs("train", 300, seed=2) + world.text_pairs("heldout", 300, seed=2):
        assert set(triple) <= strings
        assert {t for s in triple for t in s.split()} <= tokens


@pytest.mark.parametrize("modality,script", KINDS)
def test_negative_changes_exactly_one_attribute(modality, script):
    for split in world.SPLITS:
        for x in world.items(modality, split, 40, seed=7, script=script):
            assert x.negative not in x.captions
            changed = [k for k in x.attributes if x.attributes[k] != x.negative_attributes.get(k)]
            assert len(changed) == 1 and x.attributes.keys() == x.negative_attributes.keys()
            if "number" in x.attributes:  # a document's one attribute: exactly one digit differs
                pairs = zip(x.attributes["number"], x.negative_attributes["number"])
                assert sum(a != b for a, b in pairs) == 1
            if split == "train":   # training text never contains a held-out combination
                assert not world.is_heldout(_source_modality(x), x.negative_attributes)


def _source_modality(item):
    """The caption space an item comes from (a text item borrows another modality's)."""
    marker = {"kind": "image", "motion": "video", "pitch": "audio", "number": "document"}
    return next(m for key, m in marker.items() if key in item.attributes)


def test_text_pairs_cover_all_modalities_and_stay_in_split():
    pairs = world.text_pairs("train", 2000, seed=0)
    assert pairs == world.text_pairs("train", 2000, seed=0) and pairs != world.text_pairs("train", 2000, seed=1)
    assert all(a != p and n not in (a, p) for a, p, n in pairs)
    heldout_text = {world.caption(m, a, k) for m in world.CAPTIONED for a in world.combinations(m, "heldout")
                    for k in range(world.N_PARAPHRASES)}
    assert heldout_text.isdisjoint(s for triple in pairs for s in triple)
    source = {world.caption(m, c, k): m for m in world.CAPTIONED for c in world._all_combinations(m)
              for k in range(world.N_PARAPHRASES)}
    counts = {m: sum(source[anchor] == m for anchor, _, _ in pairs) for m in world.CAPTIONED}
    assert all(350 < c < 650 for c in counts.values()), counts   # about 2000 / 4 each
    assert all(source[a] == source[p] == source[n] for a, p, n in pairs)


def test_image_shows_the_colour_at_each_shape_centre():
    for x in world.items("image", "train", 200, seed=0):
        pixels = np.array(x.media)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        colours = [x.attributes["colour"]] + ([x.attributes["colour2"]] if "colour2" in x.attributes else [])
        assert len(x.geometry["centers"]) == len(colours)
        for (cx, cy), colour in zip(x.geometry["centers"], colours):
            assert tuple(pixels[cy, cx]) == world.COLOUR_RGB[colour]
        assert tuple(pixels[0, 0]) == render.BACKGROUND or tuple(pixels[63, 63]) == render.BACKGROUND


def test_large_shapes_are_larger_than_small_ones():
    area = lambda size: np.mean([(np.array(world.render_item("image", dict(kind="one", colour="blue", shape=s, size=size,
                                 position="center"), seed)[0]) != render.BACKGROUND).any(-1).sum()
                                 for s in world.SHAPES for seed in range(3)])
    assert area("large") > 2.5 * area("small")


@pytest.mark.parametrize("timbre", world.TIMBRES)
@pytest.mark.parametrize("contour", world.CONTOURS)
def test_audio_peak_frequency_orders_low_mid_high(timbre, contour):
    peaks = []
    for pitch in ("low", "mid", "high"):
        wave, _ = world.render_item("audio", dict(pitch=pitch, timbre=timbre, rhythm="steady", contour=contour), seed=1)
        assert wave.dtype == np.float32 and wave.shape == (16000,) and np.abs(wave).max() <= 0.6
        peaks.append(np.argmax(np.abs(np.fft.rfft(wave))))   # bin i = i Hz for 1 s at 16 kHz
    assert peaks[0] < peaks[1] < peaks[2]
    for peak, f0 in zip(peaks, world.PITCH_HZ.values()):  # inside the sweep (+ 3% jitter)
        sweep = render.CONTOUR_SWEEP if contour != "flat" else 1.0
        assert 0.95 * f0 / sweep < peak < 1.05 * sweep * f0


@pytest.mark.parametrize("rhythm,count", [("steady", 1), ("twice", 2), ("thrice", 3), ("pulsing", 8)])
def test_audio_rhythm_has_the_right_number_of_beeps(rhythm, count):
    wave, _ = world.render_item("audio", dict(pitch="mid", timbre="buzz", rhythm=rhythm, contour="flat"), seed=0)
    energy = np.sqrt((wave[:16000 // 160 * 160].reshape(-1, 160) ** 2).mean(1))   # 10 ms frames, like Whisper
    on = energy > 0.5 * energy.max()
    assert int(on[0]) + int(np.sum(np.diff(on.astype(int)) == 1)) == count


def test_audio_contour_rises_and_falls():
    def dominant(wave, start):
        return np.argmax(np.abs(np.fft.rfft(wave[start:start + 3200])))
    for contour, sign in world.CONTOURS.items():
        wave, _ = world.render_item("audio", dict(pitch="mid", timbre="whistle", rhythm="steady", contour=contour), 0)
        early, late = dominant(wave, 1000), dominant(wave, 12000)
        assert np.sign(late - early) == sign if sign else abs(late - early) <= 10
        if sign:  # f(t) = f0 * SWEEP^(2t - 1): between the windows' centres (t = 0.16 s, 0.85 s), SWEEP^1.375
            assert (late / early) ** sign == pytest.approx(render.CONTOUR_SWEEP ** 1.375, rel=0.1)


def test_video_frames_are_even_differ_and_show_the_motion():
    for x in world.items("video", "train", 60, seed=0):
        frames = [np.array(f) for f in x.media]
        assert len(frames) == render.N_FRAMES and len(frames) % 2 == 0
        assert all(f.shape == (64, 64, 3) for f in frames)
        assert all((a != b).any() for a, b in zip(frames, frames[1:]))
        (x0, y0), (x1, y1) = x.geometry["centers"][0], x.geometry["centers"][-1]
        r0, r1 = x.geometry["radii"][0], x.geometry["radii"][-1]
        motion = x.attributes["motion"]
        expected = {"rightward": x1 > x0, "leftward": x1 < x0, "up": y1 < y0, "down": y1 > y0,
                    "grow": r1 > r0, "shrink": r1 < r0}.get(motion)
        assert expected if motion != "recolour" else (
            tuple(frames[0][y0, x0]) == world.COLOUR_RGB[x.attributes["colour"]]
            and tuple(frames[-1][y1, x1]) == world.COLOUR_RGB[x.attributes["colour2"]])


def test_documents_in_both_scripts_render_differently():
    for script in world.SCRIPTS:
        glyphs = render.glyphs(script)
        assert sorted(glyphs) == list("0123456789") and len({g.tobytes() for g in glyphs.values()}) == 10
        assert all(g.shape == (7, 5) and g.sum() >= 7 for g in glyphs.values())
    latin_shapes = {g.tobytes() for g in render.glyphs("latin").values()}
    assert latin_shapes.isdisjoint(g.tobytes() for g in render.glyphs("alien").values())
    for number in ("407", "111", "989"):
        latin, geometry = world.render_item("document", {"number": number}, seed=0, script="latin")
        alien, _ = world.render_item("document", {"number": number}, seed=0, script="alien")
        latin, alien = np.array(latin), np.array(alien)
        assert latin.shape == alien.shape == (16, 64, 3)
        assert set(np.unique(latin)) == {0, 255} and set(np.unique(alien)) == {0, 255}
        assert (latin != alien).any()
        # each glyph (x2: 14 x 10 px) is drawn whole, inside its own 16 x 16 cell (one merged vision token)
        for digit, (x, y) in zip(number, geometry["offsets"]):
            ink = latin[y:y + 14, x:x + 10, 0] == 0
            assert (ink == np.kron(render.glyphs("latin")[digit], np.ones((2, 2), bool))).all()
            assert x // 16 == (x + 9) // 16 and 0 <= y and y + 14 <= 16
        assert (latin[..., 0] == 0).sum() == sum(2 * 2 * render.glyphs("latin")[d].sum() for d in number)
    docs = world.items("document", "train", 5, seed=0, script="alien")
    assert all(d.script == "alien" for d in docs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        world.items("smell", "train", 2)
    with pytest.raises(ValueError):
        world.items("image", "test", 2)
    with pytest.raises(ValueError):
        world.items("document", "train", 2, script="klingon")
    with pytest.raises(ValueError):
        world.items("image", "train", 2, script="alien")
    with pytest.raises(ValueError):
        world.text_pairs("validation", 2)


def test_dump_writes_files_that_reload(tmp_path, capsys):
    world.main(["--dump", str(tmp_path), "--n", "2", "--seed", "1"])
    assert "captions.jsonl" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "captions.jsonl")]
    assert len(records) == 10
    kinds = set()
    for record in records:
        assert set(record) == {"anchor", "positive", "negative"}
        assert record["positive"]["text"] and record["negative"]["text"] != record["positive"]["text"]
        (kind, path), = [(k, v) for k, v in record["anchor"].items() if k.endswith("_path") and v]
        kinds.add(kind)
        assert not os.path.isabs(path)
        full = tmp_path / path
        if kind == "audio_path":
            wave, rate = soundfile.read(full, dtype="float32")
            assert rate == 16000 and wave.shape == (16000,)
        else:
            with Image.open(full) as image:
                assert image.size in ((64, 64), (64, 16))
                assert getattr(image, "n_frames", 1) == (4 if kind == "video_path" else 1)
    assert kinds == {"image_path", "video_path", "audio_path"}
    with Image.open(tmp_path / "overview.png") as overview:
        assert overview.size[0] > 300


def test_save_item_roundtrip(tmp_path):
    audio = world.items("audio", "heldout", 1, seed=0)[0]
    record = world.save_item(audio, str(tmp_path / "media"), "a", relative_to=str(tmp_path))
    assert record["anchor"] == {"audio_path": os.path.join("media", "a.wav"), "text": ""}
    assert np.array_equal(soundfile.read(tmp_path / "media" / "a.wav", dtype="float32")[0], audio.media)
    video = world.items("video", "train", 1, seed=0)[0]
    world.save_item(video, str(tmp_path), "v")
    with Image.open(tmp_path / "v.gif") as gif:
        for i, frame in enumerate(video.media):
            gif.seek(i)
            assert np.array_equal(np.array(gif.convert("RGB")), np.array(frame))   # few colours: lossless
    text = world.items("text", "train", 1, seed=0)[0]
    assert world.save_item(text, str(tmp_path), "t")["anchor"] == {"image_path": "", "text": text.captions[1]}
