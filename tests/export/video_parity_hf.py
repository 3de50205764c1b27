"""The transformers side of tests/export/test_video_parity.py, run by the second environment's Python (torch 2.14.1 +
torchvision 0.29.1, `make video-parity-env`): transformers' own LlavaNextVideoProcessor loaded from the export,
its frame sampling, PyAV decoding (transformers.video_utils.load_video), pixels and video-token counts, and the
exported model's loss. Imports nothing of the project (another torch). Usage: python video_parity_hf.py CASES.json
OUT.json, where each case names a clip, the frame count and numbers, the turns and the labels; writes what
transformers made."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration
from transformers.video_utils import VideoMetadata, load_video


def main(cases_path: str, out_path: str) -> None:
    spec = json.loads(open(cases_path).read())
    results, loaded = [], {}
    for case in spec["cases"]:
        if case["export"] not in loaded:
            loaded[case["export"]] = (AutoProcessor.from_pretrained(case["export"]),
                                      LlavaNextVideoForConditionalGeneration.from_pretrained(case["export"]).eval())
        processor, model = loaded[case["export"]]
        video, meta = load_video(case["clip"], backend="pyav")  # every frame, transformers' PyAV reader
        metadata = VideoMetadata(total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration)
        # transformers refuses more frames than a clip has; the loader then takes all of them
        take = min(case["frames"], metadata.total_num_frames)
        indices = processor.video_processor.sample_frames(metadata, num_frames=take)
        frames = video[np.asarray(case["indices"])]
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": case["question"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": case["answer"]}]}]
        chat = processor.apply_chat_template(messages)  # the export's template on typed content
        inputs = processor(text=chat, videos=[frames], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            loss = model(**inputs, labels=torch.tensor([case["labels"]])).loss
        results.append({
            "indices": [int(i) for i in indices],
            "decoded_equal": bool(np.array_equal(frames, np.load(case["our_frames"]))),
            "pixels": inputs["pixel_values_videos"][0].numpy().tolist(),
            "input_ids": inputs["input_ids"][0].tolist(),
            "chat": chat,
            "loss": float(loss),
            "processor": type(processor).__name__,
        })
    open(out_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
