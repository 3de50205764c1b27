"""QLoRA smoke check on one GPU (bitsandbytes NF4 needs CUDA): tiny local models and synthetic shards, a base export
to start from, a few `pretrain train` steps with `model.lora.quantize: nf4` (ZeRO-2, bf16, world size 1), finite
losses, then `pretrain convert --adapter` and the adapter loaded onto the base with PEFT (finite logits), and the
merged export (base weights from the unquantized originals). Needs peft, bitsandbytes and deepspeed installed.

    python tools/gpu_qlora_smoke.py OUT_DIR [--steps 4] [--quantize none]   (none: the same path as plain LoRA,
                                                                              which runs on a CPU too)

Writes OUT_DIR/qlora_smoke.json and prints it as the last line: {"ok": bool, "losses": [...], ...}. Exit 0 when ok.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_export(out: Path, tokenizer, llm: Path, vision: Path) -> Path:
    """What a stage-1 `pretrain convert` gives: a Llava directory with tokenizer and processor."""
    from pretrain.config import ModelConfig
    from pretrain.export.hf import processor_from
    from pretrain.model.build import build_model
    from pretrain.model.processing import image_processor_for

    mcfg = ModelConfig(llm=str(llm), vision=str(vision), vision_feature_layer=-1)
    model = build_model(mcfg, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor_for(mcfg).save_pretrained(out)
    processor_from(out, model.config).save_pretrained(out)
    return out


def pretrain(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def smoke(out: Path, steps: int, quantize: str = "nf4") -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from pretrain.demo import prepare, tokenizer_corpus
    from pretrain.model.tiny import build_tokenizer

    report: dict = {"ok": False, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    paths = prepare(out / "demo", 64, 8)
    tok = build_tokenizer(tokenizer_corpus(), vocab_size=400)
    base = base_export(out / "base", tok, Path(paths["model.llm"]), Path(paths["model.vision"]))
    run = out / "run"
    overrides = [f"{k}={v}" for k, v in paths.items() if k != "run.output_dir"] + [
        f"run.output_dir={run}", f"model.init_from={base}", "train.stage=finetune", f"train.max_steps={steps}",
        "train.log_every=1", "train.val_every=0", f"checkpoint.every_steps={steps}", "train.progress_bar=false",
        "train.precision=bf16", "deepspeed.zero_stage=2", "model.lora.r=8", "model.lora.alpha=16",
        f"model.lora.quantize={quantize}", "objectives.contrastive_weight=0", "data.num_workers=1",
        "train.lr_multipliers={}"]
    proc = pretrain("train", str(ROOT / "configs" / "demo.yaml"), *overrides)
    report["train_rc"] = proc.returncode
    if proc.returncode != 0:
        report["train_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return report
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    report["losses"] = losses
    adapter = pretrain("convert", str(run), str(out / "adapter"), "--adapter")
    merged = pretrain("convert", str(run), str(out / "merged"))
    report["adapter_rc"], report["merged_rc"] = adapter.returncode, merged.returncode
    if adapter.returncode or merged.returncode:
        report["convert_tail"] = (adapter.stdout + adapter.stderr + merged.stdout + merged.stderr)[-3000:]
        return report
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), out / "adapter").eval()
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    report["adapter_logits_finite"] = bool(torch.isfinite(logits).all())
    report["adapter_files"] = sorted(p.name for p in (out / "adapter").iterdir())
    report["ok"] = (len(losses) == steps and all(math.isfinite(x) for x in losses)
                    and report["adapter_logits_finite"])
    return report


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_qlora_smoke.py")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quantize", choices=("nf4", "none"), default="nf4")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = smoke(out, args.steps, args.quantize)
    except Exception as err:  # noqa: BLE001  (a smoke check reports whatever stopped it)
        report = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
    text = json.dumps(report)
    (out / "qlora_smoke.json").write_text(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
