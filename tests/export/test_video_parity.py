"""Video parity with transformers' own LlavaNextVideoProcessor and LlavaNextVideoForConditionalGeneration: for clips
of several sizes and lengths, the loader's sampled frame numbers equal the processor's `sample_frames`, its decoded
frames (seeking) equal transformers' PyAV reader's, its pixels and video-token counts equal the processor's for the
same frames, the export's chat template renders `{"type": "video"}` as training rendered the `<video>` turn, and the
exported model's caption loss through plain transformers equals the training forward's.

transformers' video processors need torchvision, which does not load beside the project's CPU torch 2.13.0, so the
transformers side runs in the second environment `make video-parity-env` builds (torch 2.14.1 + torchvision 0.29.1;
`make test` builds it): tests/export/video_parity_hf.py, in a subprocess."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.clips import make_clip, video_config

from pretrain.data.anyres import llava_next_processor
from pretrain.data.batching import collate
from pretrain.data.text import to_messages
from pretrain.data.video import clip_frames
from pretrain.export.chat_template import export_chat_template
from pretrain.export.video_processor import add_video_processor
from pretrain.model.build import build_model
from pretrain.model.processing import build_processing
from pretrain.model.vlm import VLMForTraining
from pretrain.tokens import VIDEO_TOKEN

ROOT = Path(__file__).resolve().parents[2]
VIDEO_PYTHON = ROOT / ".venv-video" / "bin" / "python"
QUESTION, ANSWER = "what happens?", "the picture gets brighter."
# (frames, width, height, data.video_frames): non-square, a tower-size clip, larger than the tower, a short clip
CLIPS = [(24, 48, 40, 4), (10, 32, 32, 4), (40, 90, 64, 6), (3, 40, 36, 8)]


@pytest.mark.slow
def test_loader_and_training_equal_transformers_video_processor_and_model(tmp_path, tokenizer):
    """CLIP (resize the short side, centre crop) and SigLIP (resize to the square) towers, one subprocess."""
    if not VIDEO_PYTHON.is_file():
        pytest.fail(f"{VIDEO_PYTHON} is missing: run `make video-parity-env` (make test builds it)")
    tok = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path / "tok"))
    tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    cases, ours = [], []
    for vision in ("clip", "siglip"):
        _cases(tmp_path / vision, tok, vision, cases, ours)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({"cases": cases}))
    done = subprocess.run([str(VIDEO_PYTHON), str(Path(__file__).with_name("video_parity_hf.py")), str(spec),
                           str(tmp_path / "theirs.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for (indices, sample, loss, text), theirs in zip(ours, json.loads((tmp_path / "theirs.json").read_text()),
                                                     strict=True):
        assert theirs["processor"] == "LlavaNextVideoProcessor"
        assert theirs["indices"] == indices  # the same frames sampled
        assert theirs["decoded_equal"]  # seeking decode == transformers' full PyAV decode at those frames
        assert theirs["chat"] == text  # {"type": "video"} renders as training's <video> turn
        assert theirs["input_ids"] == sample.input_ids  # the same video-token count, in place
        torch.testing.assert_close(torch.tensor(theirs["pixels"]), sample.video_pixels, rtol=0, atol=0)
        assert theirs["loss"] == pytest.approx(loss, rel=1e-5)


def _cases(root: Path, tok, vision: str, cases: list, ours: list) -> None:
    """One export for the tower and a case per clip of CLIPS: what transformers gets, and what training made."""
    root.mkdir(parents=True)
    export = root / "export"
    model = None
    for n, (frames, width, height, take) in enumerate(CLIPS):
        processing = build_processing(video_config(vision, frames=take), tok)
        if model is None:
            model = build_model(video_config(vision).model, tok).eval()
            _export(export, model, processing, tok)
        clip = make_clip(frames=frames, width=width, height=height)
        (root / f"clip{n}.mp4").write_bytes(clip)
        turns = [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]
        sample = processing.processor({"mp4": clip, "json": json.dumps({"conversations": turns}).encode()})
        decoded, indices, _ = clip_frames(clip, take, None, 10**8)
        np.save(root / f"ours{n}.npy", np.stack(decoded))
        with torch.no_grad():
            loss_sum, count = VLMForTraining(model).eval()(collate([[sample]], tok.pad_token_id))
        ours.append((indices, sample, float(loss_sum / count), _training_text(tok, turns)))
        cases.append({"export": str(export), "clip": str(root / f"clip{n}.mp4"), "frames": take,
                      "indices": indices, "our_frames": str(root / f"ours{n}.npy"), "question": QUESTION,
                      "answer": ANSWER, "labels": sample.labels})


def _saved(tokenizer, path: Path) -> Path:
    tokenizer.save_pretrained(path)
    return path


def _training_text(tok, turns: list[dict]) -> str:
    """The text training tokenizes for these turns (TextProcessor: the template's render, bos first)."""
    text = tok.apply_chat_template(to_messages(turns, 0), tokenize=False)
    return text if text.startswith(tok.bos_token) else tok.bos_token + text


def _export(out: Path, model, processing, tok) -> None:
    """The model and the processor files as `pretrain convert` writes them (pretrain.export.hf.save_processor)."""
    model.save_pretrained(out)
    tok = tok.__class__.from_pretrained(_saved(tok, out))
    tok.chat_template = export_chat_template(tok.chat_template)
    llava_next_processor(processing.image_processor, tok, model.config).save_pretrained(out)
    add_video_processor(out, model.config)
