"""A model folder that sentence-transformers loads as-is, giving lco_mini's vectors.

    python -m lco_mini.interop.export out/merged                        # add the files in place
    python -m lco_mini.interop.export --model Qwen/Qwen2.5-VL-3B-Instruct --adapter run/adapter --out st_model

train.py writes these files into every model it saves (base/, merged/, control/). Without them,
SentenceTransformer(folder) would load the folder with *mean* pooling and no prompt: other vectors.
With them, `SentenceTransformer(folder).encode(inputs)` equals `lco_mini.load(folder).encode(inputs)`
(tests/test_interop.py checks it to 1e-5 for text, image, audio and video):

  modules.json                       Transformer -> Pooling (1_Pooling) -> Normalize (2_Normalize)
  sentence_bert_config.json          the Transformer module: "feature-extraction" loads AutoModel, the
                                     decoder without lm_head (what backbone.embed_batch runs); every
                                     input becomes a chat message rendered with the LCO template
                                     below, left padded
  1_Pooling/config.json              last-token pooling ("lasttoken"; the older boolean spelling too)
  2_Normalize/                       L2 normalisation
  config_sentence_transformers.json  no extra prompts, cosine similarity
  lco_embedding_chat_template.jinja  the same template as a file, for vLLM's --chat-template

The LCO template: sentence-transformers passes a chat template string to the processor's
apply_chat_template. Ours rewrites each user turn as backbone.chat_content does (media first,
then the text and the modality's "Summarize the above ... in one word:" instruction), forces the
generation prompt, then hands the turn to the model's own template unchanged.

What sentence-transformers does differently (said when the export runs): it cuts a long text by
the whole prompt's length, not the item's 650 tokens; it hands images above the processor's pixel
budget and videos of more than 16 frames to the processor as they are (lco_mini shrinks and
subsamples them first); it takes audio as float arrays at 16 kHz only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from lco_mini import backbone
from lco_mini.backbone import MEDIA, PROMPTS, input_kinds
from lco_mini.support import cli
from lco_mini.support.checkpoint import CheckpointError

DIFFERENCES = ("sentence-transformers gives lco_mini's vectors except for texts over 650 tokens, images "
               "above the processor's pixel budget, videos of more than 16 frames and audio that is not a "
               "16 kHz float array (lco_mini cuts, shrinks, subsamples and resamples them first)")


def _jinja(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


def lco_prelude() -> str:
    """Jinja that rewrites every user turn as backbone.chat_content does, then renders nothing itself."""
    media_prompt = "{" + ", ".join(f"{_jinja(kind)}: {_jinja(PROMPTS[kind])}" for kind in MEDIA) + "}"
    return (
        "{#- LCO-Emb embedding prompt (lco_mini): rewrite each user turn, then the model's own template -#}\n"
        "{%- set lco = namespace(messages=[]) -%}\n"
        # OpenAI-style part types (vLLM, transformers) count as the medium they carry
        "{%- set lco_kind = {'image': 'image', 'image_url': 'image', 'video': 'video', 'video_url': 'video',"
        " 'audio': 'audio', 'audio_url': 'audio', 'input_audio': 'audio'} -%}\n"
        f"{{%- set lco_media_prompt = {media_prompt} -%}}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['role'] == 'user' -%}\n"
        "    {%- set turn = namespace(media=[], kinds=[], text='') -%}\n"
        "    {%- if message['content'] is string -%}{%- set turn.text = message['content'] -%}\n"
        "    {%- else -%}\n"
        f"      {{%- for kind in {list(MEDIA)} -%}}{{%- for part in message['content'] -%}}\n"  # backbone.MEDIA order
        "        {%- if lco_kind.get(part['type']) == kind -%}\n"
        "          {%- set turn.media = turn.media + [part] -%}{%- set turn.kinds = turn.kinds + [kind] -%}\n"
        "        {%- endif -%}\n"
        "      {%- endfor -%}{%- endfor -%}\n"
        "      {%- for part in message['content'] -%}\n"
        "        {%- if part['type'] == 'text' -%}{%- set turn.text = turn.text + part['text'] -%}{%- endif -%}\n"
        "      {%- endfor -%}\n"
        "    {%- endif -%}\n"
        "    {%- if turn.media | length == 0 -%}\n"
        f"      {{%- set prompt = turn.text + {_jinja(PROMPTS['text'].format(text=''))} -%}}\n"
        "    {%- elif turn.media | length == 1 and turn.text == '' -%}\n"
        "      {%- set prompt = lco_media_prompt[turn.kinds[0]] -%}\n"
        "    {%- else -%}\n"
        f"      {{%- set prompt = turn.text + {_jinja(PROMPTS['interleaved'].format(text=''))} -%}}\n"
        "    {%- endif -%}\n"
        "    {%- set lco.messages = lco.messages + [{'role': 'user', 'content': turn.media + "
        "[{'type': 'text', 'text': prompt}]}] -%}\n"
        "  {%- else -%}{%- set lco.messages = lco.messages + [message] -%}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- set messages = lco.messages -%}\n"
        "{%- set add_generation_prompt = true %}"  # the embedding is read at the generation prompt
    )  # no "-%}" on the last tag: the model's own template starts right after it


def _base_template(processor) -> str:
    template = processor.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        raise ValueError("the processor has no chat template")
    return template


def sentence_transformers_files(model_config, processor) -> dict[str, object]:
    """file name -> JSON content of every sentence-transformers file, for a model and its processor."""
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    modality_config = {kind: dict(forward) for kind in input_kinds(processor)}
    modality_config["message"] = {**forward, "format": "structured"}
    processing_kwargs = {"text": {"padding_side": "left"},
                         "chat_template": {"chat_template": lco_prelude() + _base_template(processor)}}
    if (size := backbone.saved_video_size(processor)) is not None:
        processing_kwargs["video"] = {"size": size}
    module = "sentence_transformers.{}.modules.{}"
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": module.format("base", "transformer.Transformer")},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": module.format("sentence_transformer", "pooling.Pooling")},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": module.format("base", "normalize.Normalize")}],
        "sentence_bert_config.json": {"transformer_task": "feature-extraction", "modality_config": modality_config,
                                      "module_output_name": "token_embeddings",
                                      "processing_kwargs": processing_kwargs, "unpad_inputs": False},
        # "pooling_mode_lasttoken": the older spelling, which older vLLM and TEI read
        "1_Pooling/config.json": {"embedding_dimension": model_config.get_text_config().hidden_size,
                                  "pooling_mode": "lasttoken", "pooling_mode_lasttoken": True, "include_prompt": True},
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "requirements": {"sentence_transformers": {
                "specifier": ">=6.3", "reason": "the LCO-Emb prompt comes from processing_kwargs.chat_template"}}},
    }


def write_sentence_transformers_files(folder, model_config, processor) -> None:
    """Write the files into a saved model folder (written whole: a reader never sees half of them)."""
    folder = Path(folder)
    files = sentence_transformers_files(model_config, processor)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    (folder / "2_Normalize").mkdir(exist_ok=True)
    template = files["sentence_bert_config.json"]["processing_kwargs"]["chat_template"]["chat_template"]
    (folder / "lco_embedding_chat_template.jinja").write_text(template)


def save_model(model, processor, folder: Path) -> None:
    """save_pretrained into a temporary folder, with the sentence-transformers files, then rename:
    a folder that exists is complete."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        backbone.record_attention(tmp, model.config._attn_implementation)  # the tiny model's eager stays eager
        write_sentence_transformers_files(tmp, model.config, processor)
    except (OSError, RuntimeError) as e:  # a full disk: safetensors and json raise either
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the earlier {folder} is kept" if folder.exists() else "nothing was kept"
        raise CheckpointError(f"could not write the model folder {folder}: "
                              f"{getattr(e, 'strerror', None) or ' '.join(str(e).split())[:200]}; "
                              f"the partial folder was removed, {kept}") from None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def main(argv=None) -> None:
    p = cli.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", help="a model folder to add the files to, in place")
    p.add_argument("--model", help="a model folder or hub id to export to --out (with --adapter: merged)")
    p.add_argument("--adapter", help="a LoRA adapter folder (adapter/ of a train.py run) to merge into --model")
    p.add_argument("--out", help="the new folder: the model, merged, and the sentence-transformers files")
    args = p.parse_args(argv)
    if bool(args.folder) == bool(args.model):
        p.error("give a model folder to complete in place, or --model (and --adapter) with --out")
    if args.model and not args.out:
        p.error("--model needs --out (the folder to write)")
    from lco_mini import lora

    source = args.folder or args.model
    if args.out and Path(args.out).exists():
        cli.fail(f"--out {args.out}: already exists; choose a new folder")
    try:
        model, processor = backbone.load(source, device="cpu", dtype=None)
        if args.adapter:
            lora.load_adapter(model, args.adapter)
            model = lora.merge_lora(model)
    except (OSError, ValueError) as error:
        cli.fail(" ".join(str(error).split())[:300])
    if args.folder:
        write_sentence_transformers_files(source, model.config, processor)
        out = Path(source)
    else:
        out = Path(args.out)
        save_model(model, processor, out)  # writes the sentence-transformers files too
    print(f"wrote the sentence-transformers files to {out}; load it with SentenceTransformer({str(out)!r})")
    print(f"note: {DIFFERENCES}")


if __name__ == "__main__":
    main()
