#!/usr/bin/env python3
"""Outside check: load a checkpoint written by nano-dsv3 with Hugging Face transformers' DeepseekV3ForCausalLM
and compare it with ours (fp32, TF32 off). Optional: needs PyTorch and transformers (the GPU machine has them);
never part of the build or the test suite. Two modes:

1) Logits of an exported random model (YaRN on with --export-yarn):

    build/06_full_model/06_full_model --export out/hf_check [--export-preset small] [--export-yarn]
    python3 06_full_model/check_transformers.py out/hf_check

   Prints the max absolute and normalised error; exits 1 when the normalised error exceeds --tol.

2) Validation loss of a trained checkpoint on its run's own val.bin windows (stage 07):

    build/07_train_gpu/07_train_gpu eval --precision fp32 > out/eval.txt     # ours, same windows
    python3 06_full_model/check_transformers.py --checkpoint out/07_train_gpu/run/checkpoints/best \\
        --val out/07_train_gpu/data/val.bin --ours out/eval.txt

   The windows are the trainer's (train.h evaluate()): tokens j*T .. j*T+T of val.bin for every whole window,
   T = the checkpoint's seq_len (trainer_state.json). Prints transformers' mean cross-entropy, ours (fp32 from
   `eval`, and the bf16 figure the trainer recorded), and the same with every layer's routing bias shifted so its
   minimum is 0 (transformers masks dropped groups with 0 where DeepSeek's model.py uses -inf: the two agree only
   while every biased score s + b is positive; a uniform shift per layer changes no choice of ours). Exits 1
   when transformers (shifted) and ours (fp32) differ by more than --val-tol relative.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers


def load_model(path, device):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    return model.to(device)


def check_logits(args, device):
    tokens = [[int(x) for x in line.split()] for line in open(f"{args.export_dir}/tokens.txt") if line.strip()]
    ids = torch.tensor(tokens, dtype=torch.long)
    model = load_model(f"{args.export_dir}/checkpoint", device)
    cfg = json.load(open(f"{args.export_dir}/checkpoint/config.json"))
    with torch.no_grad():
        hf = model(ids.to(device)).logits.float().cpu().numpy()
    ours = np.fromfile(f"{args.export_dir}/logits.f32", dtype=np.float32).reshape(hf.shape)
    diff = np.abs(ours - hf)
    rel = np.linalg.norm(ours - hf) / np.linalg.norm(hf)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device}")
    print(f"rope_scaling {cfg.get('rope_scaling')}, max_position_embeddings {cfg['max_position_embeddings']}")
    print(f"logits {hf.shape}: max abs err {diff.max():.3e}, max rel err {(diff / (np.abs(hf) + 1e-6)).max():.3e}, "
          f"normalised err {rel:.3e}")
    print(f"argmax agreement {np.mean(ours.argmax(-1) == hf.argmax(-1)):.4f}")
    if not rel <= args.tol:
        print(f"FAIL: normalised error above {args.tol}")
        return 1
    print("ok")
    return 0


def val_ce(model, windows, device, batch):
    """Mean cross-entropy (nats) over every target of the (W, T+1) windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = torch.tensor(windows[i:i + batch], dtype=torch.long, device=device)
            logits = model(w[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += loss.item()
            count += w[:, 1:].numel()
    return total / count


def check_val(args, device):
    state = json.load(open(os.path.join(args.checkpoint, "trainer_state.json")))
    T = state["train_config"]["seq_len"]
    recorded = state["best"].get("val_ce")
    val = np.fromfile(args.val, dtype="<u2").astype(np.int64)
    W = (len(val) - 1) // T
    windows = [val[j * T:j * T + T + 1] for j in range(W)]
    model = load_model(args.checkpoint, device)
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    if not biases:  # some transformers versions register the bias as a parameter
        biases = [p for n, p in model.named_parameters() if n.endswith("e_score_correction_bias")]
    negative = sum(int((b < 0).sum()) for b in biases)
    hf = val_ce(model, windows, device, args.batch)
    with torch.no_grad():
        for b in biases:
            b.sub_(b.min())
    hf_shifted = val_ce(model, windows, device, args.batch)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device}")
    print(f"{args.checkpoint}: {W} windows of {T} + 1 tokens from {args.val} ({W * T} targets); "
          f"{len(biases)} routing biases, {negative} of their entries negative")
    print(f"transformers val ce, biases as saved          {hf:.6f} nats/token")
    print(f"transformers val ce, biases shifted to min 0  {hf_shifted:.6f} nats/token")
    if recorded is not None:
        print(f"ours, recorded by the trainer (its precision) {recorded:.6f} nats/token")
    if not args.ours:
        print("(no --ours: give the output of `07_train_gpu eval --precision fp32` for the verdict)")
        return 0
    ours = None
    for line in open(args.ours):
        line = line.strip()
        if line.startswith("{") and "val_ce" in line:
            ours = json.loads(line)
    if ours is None:
        print(f"FAIL: no JSON line with val_ce in {args.ours}")
        return 1
    print(f"ours, `07_train_gpu eval` ({ours['device']})  {ours['val_ce']:.6f} nats/token")
    rel = abs(hf_shifted - ours["val_ce"]) / ours["val_ce"]
    rel_raw = abs(hf - ours["val_ce"]) / ours["val_ce"]
    print(f"relative difference: shifted {rel:.2e}, as saved {rel_raw:.2e} (tolerance {args.val_tol})")
    if not rel <= args.val_tol:
        print("FAIL")
        return 1
    print("ok" + ("" if rel_raw <= args.val_tol else " (only with the biases shifted: transformers' 0-masking)"))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", nargs="?", help="folder written by 06_full_model --export (mode 1)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed ||ours - hf|| / ||hf|| (default 1e-4)")
    ap.add_argument("--checkpoint", help="a trained checkpoint folder (mode 2)")
    ap.add_argument("--val", help="the run's val.bin (mode 2)")
    ap.add_argument("--ours", help="output of `07_train_gpu eval` on the same checkpoint and data (mode 2)")
    ap.add_argument("--val-tol", type=float, default=1e-4, help="max relative difference of the val ce (mode 2)")
    ap.add_argument("--batch", type=int, default=16, help="windows per forward (mode 2)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.checkpoint:
        if not args.val:
            ap.error("--checkpoint needs --val")
        sys.exit(check_val(args, device))
    if not args.export_dir:
        ap.error("give an export folder, or --checkpoint and --val")
    sys.exit(check_logits(args, device))


if __name__ == "__main__":
    main()
