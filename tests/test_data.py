"""The jsonl dataset: the official format parses; every mistake names its line and path."""
import json

import numpy as np
import pytest
from PIL import Image

from lco_mini.support import data


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def text_side(text):
    return {"image_path": "", "text": text}


GOOD = {"anchor": text_side("a red circle"), "positive": text_side("a circle, red"),
        "negative": text_side("a blue circle")}


def test_official_format_text_and_image(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    image_pair = {"anchor": {"image_path": "red.png", "text": ""}, "positive": text_side("red"),
                  "negative": text_side("blue")}
    pairs, bad = data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [GOOD, image_pair]))
    assert bad == 0 and len(pairs) == 2
    assert pairs[0].anchor == {"text": "a red circle"} and pairs[0].negative == {"text": "a blue circle"}
    assert pairs[1].anchor == {"image": tmp_path / "red.png"}  # resolved against the jsonl's folder
    assert data.is_text_only(pairs[0]) and not data.is_text_only(pairs[1])


def test_negative_is_optional(tmp_path):
    record = {"anchor": text_side("x"), "positive": text_side("y")}
    pairs, _ = data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert pairs[0].negative is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"anchor": text_side("x")}), "line 2: missing field 'positive'"),
    (json.dumps({"anchor": text_side(""), "positive": text_side("y")}), "line 2: anchor: empty"),
    (json.dumps({"anchor": {"text": 3}, "positive": text_side("y")}), "anchor.text: expected a string"),
    (json.dumps({"anchor": {"txt": "x"}, "positive": text_side("y")}), "unknown field"),
    (json.dumps([1, 2]), "line 2: expected a JSON object"),
])
def test_bad_lines_name_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, line])
    with pytest.raises(data.DataError, match=message) as err:
        data.read_jsonl(path)
    assert str(path) in str(err.value)


def test_missing_and_corrupt_files_are_reported(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    missing = {"anchor": {"image_path": "nowhere.png", "text": ""}, "positive": text_side("y")}
    corrupt = {"anchor": {"image_path": "broken.png", "text": ""}, "positive": text_side("y")}
    with pytest.raises(data.DataError, match=r"line 1: anchor: .*nowhere\.png"):
        data.read_jsonl(write_jsonl(tmp_path / "a.jsonl", [missing]))
    with pytest.raises(data.DataError, match=r"line 2: anchor: .*broken\.png"):
        data.read_jsonl(write_jsonl(tmp_path / "b.jsonl", [GOOD, corrupt]))


def test_skip_bad_counts_instead_of_stopping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{oops", GOOD, json.dumps({"anchor": text_side("x")})])
    pairs, bad = data.read_jsonl(path, skip_bad=True)
    assert len(pairs) == 2 and bad == 2
    assert [p.line for p in pairs] == [1, 3]


def test_all_bad_or_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="no usable examples"):
        data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", ["{oops"]), skip_bad=True)
    with pytest.raises(data.DataError, match="no such dataset file"):
        data.read_jsonl(tmp_path / "absent.jsonl")


def test_audio_path_is_decoded(tmp_path):
    import soundfile as sf
    sf.write(tmp_path / "tone.wav", np.sin(np.linspace(0, 100, 16000)).astype("float32"), 16000)
    record = {"anchor": {"audio_path": "tone.wav", "text": ""}, "positive": text_side("a tone")}
    pairs, _ = data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert pairs[0].anchor == {"audio": tmp_path / "tone.wav"}


def test_lines_split_on_newline_only_and_a_bom_is_accepted(tmp_path):
    """U+2028, U+0085 and friends are valid inside a JSON string; str.splitlines() would cut there."""
    tricky = {"anchor": text_side("one\u2028two\u0085three\x1cfour"), "positive": text_side("y")}
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n" + json.dumps(tricky, ensure_ascii=False)).encode())
    pairs, bad = data.read_jsonl(path, skip_bad=True)
    assert bad == 0 and [p.line for p in pairs] == [1, 2]
    assert pairs[1].anchor["text"] == "one\u2028two\u0085three\x1cfour"


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_byte_that_is_not_utf8_names_its_line(tmp_path, skip_bad):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + '{"anchor": {"text": "café"}, "positive": {"text": "y"}}\n'.encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.jsonl: line 2: not UTF-8 \(byte 0xe9"):
        data.read_jsonl(path, skip_bad=skip_bad)
