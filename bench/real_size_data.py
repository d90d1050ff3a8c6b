"""The small dataset bench/real_size.py runs on, in the official jsonl format: 224 x 224 shape
scenes (64 merged vision tokens at patch 14, merge 2), 2.5 s tones at 16 kHz, short captions with
a paraphrase and a hard negative each. Generated, never downloaded."""
from __future__ import annotations

import json
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
PITCHES = {"low": 220.0, "medium": 440.0, "high": 880.0}
BEEPS = {1: "once", 2: "twice", 3: "three times"}
DOC_PROMPTS = ["Describe the above image.", "Describe the above audio."]
IMAGE_SIZE, AUDIO_SECONDS, RATE = 224, 2.5, 16000


def scene_items(n: int) -> list[dict]:
    """Shape scenes: attributes, a caption, a paraphrase, and a hard negative (the colour changed)."""
    items, colors = [], list(COLORS)
    for i in range(n):
        color, shape, side = colors[i % 4], SHAPES[(i // 4) % 3], SIDES[(i // 12) % 2]
        other = colors[(i + 1) % 4]
        items.append({"color": color, "shape": shape, "side": side,
                      "caption": f"a {color} {shape} on the {side}",
                      "paraphrase": f"on the {side} there is a {color} {shape}",
                      "negative": f"a {other} {shape} on the {side}"})
    return items


def tone_items(n: int) -> list[dict]:
    items, pitches = [], list(PITCHES)
    for i in range(n):
        pitch, beeps = pitches[i % 3], 1 + (i // 3) % 3
        other = pitches[(i + 1) % 3]
        items.append({"pitch": pitch, "beeps": beeps, "caption": f"a {pitch} tone beeping {BEEPS[beeps]}",
                      "paraphrase": f"{BEEPS[beeps]}, a {pitch} beep sounds",
                      "negative": f"a {other} tone beeping {BEEPS[beeps]}"})
    return items


def draw_scene(item: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    cx = IMAGE_SIZE // 4 if item["side"] == "left" else 3 * IMAGE_SIZE // 4
    cy, r, fill = IMAGE_SIZE // 2, IMAGE_SIZE // 6, COLORS[item["color"]]
    if item["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item["shape"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    img.save(path)


def write_tone(item: dict, path: Path) -> None:
    import numpy as np
    import soundfile

    t = np.arange(int(AUDIO_SECONDS * RATE)) / RATE
    gate = np.zeros_like(t)
    for k in range(item["beeps"]):  # 0.4 s beeps, 0.2 s apart, from 0.2 s
        gate[(t >= 0.2 + 0.6 * k) & (t < 0.6 + 0.6 * k)] = 1.0
    wave = 0.4 * gate * np.sin(2 * np.pi * PITCHES[item["pitch"]] * t)
    soundfile.write(path, wave.astype(np.float32), RATE, subtype="PCM_16")


def side(text: str = "", image: str = "", audio: str = "") -> dict:
    record = {"image_path": image, "text": text}
    if audio:
        record["audio_path"] = audio
    return record


def write_data(folder: Path, family: str) -> dict[str, Path]:
    """pairs.jsonl (contrastive: 12 text pairs, 4 image and, for Omni, 4 audio pairs), docs.jsonl
    (continual pretraining: image / audio -> caption), eval.jsonl (held-out: 4 image, 4 text and,
    for Omni, 4 audio anchors), in the official format; paths relative to the folder."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    scenes, tones = scene_items(24), tone_items(9)
    for i, item in enumerate(scenes):
        draw_scene(item, folder / "media" / f"scene_{i:02d}.png")
    if family == "qwen2_5_omni":
        for i, item in enumerate(tones):
            write_tone(item, folder / "media" / f"tone_{i:02d}.wav")
    image = lambda i: f"media/scene_{i:02d}.png"  # noqa: E731
    audio = lambda i: f"media/tone_{i:02d}.wav"  # noqa: E731
    pairs = [{"anchor": side(s["caption"]), "positive": side(s["paraphrase"]), "negative": side(s["negative"])}
             for s in scenes[:12]]
    pairs += [{"anchor": side(image=image(i)), "positive": side(scenes[i]["caption"]),
               "negative": side(scenes[i]["negative"])} for i in range(12, 16)]
    docs = [{"anchor": side(image=image(i)), "positive": side(scenes[i]["caption"])} for i in range(12, 20)]
    held = [{"anchor": side(image=image(i)), "positive": side(scenes[i]["caption"]),
             "negative": side(scenes[i]["negative"])} for i in range(20, 24)]
    held += [{"anchor": side(s["paraphrase"]), "positive": side(s["caption"]), "negative": side(s["negative"])}
             for s in scenes[16:20]]
    if family == "qwen2_5_omni":
        pairs += [{"anchor": side(audio=audio(i)), "positive": side(tones[i]["caption"]),
                   "negative": side(tones[i]["negative"])} for i in range(4)]
        docs += [{"anchor": side(audio=audio(i)), "positive": side(tones[i]["caption"])} for i in range(4)]
        held += [{"anchor": side(audio=audio(i)), "positive": side(tones[i]["caption"]),
                  "negative": side(tones[i]["negative"])} for i in range(4, 8)]
    files = {}
    for name, records in (("pairs", pairs), ("docs", docs), ("eval", held)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    files["image"] = folder / image(20)
    files["image_text"] = scenes[20]["caption"]
    if family == "qwen2_5_omni":
        files["audio"] = folder / audio(4)
        files["audio_text"] = tones[4]["caption"]
    return files
