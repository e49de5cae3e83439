#!/usr/bin/env python3
"""Outside check: load a checkpoint written by nano-dsv3 with Hugging Face transformers' DeepseekV3ForCausalLM
and compare its logits with ours on the same tokens (fp32). Optional: needs PyTorch and transformers (the GPU
machine has them); never part of the build or the test suite.

    build/06_full_model/06_full_model --export out/hf_check [--export-preset small]
    python3 06_full_model/check_transformers.py out/hf_check

Prints the max absolute and relative error and exits 1 when the relative error exceeds --tol.
"""
import argparse
import sys

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed ||ours - hf|| / ||hf|| (default 1e-4)")
    args = ap.parse_args()

    tokens = [[int(x) for x in line.split()] for line in open(f"{args.export_dir}/tokens.txt") if line.strip()]
    ids = torch.tensor(tokens, dtype=torch.long)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        f"{args.export_dir}/checkpoint", torch_dtype=torch.float32)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        hf = model(ids.to(device)).logits.float().cpu().numpy()
    ours = np.fromfile(f"{args.export_dir}/logits.f32", dtype=np.float32).reshape(hf.shape)
    diff = np.abs(ours - hf)
    rel = np.linalg.norm(ours - hf) / np.linalg.norm(hf)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device}")
    print(f"logits {hf.shape}: max abs err {diff.max():.3e}, max rel err {(diff / (np.abs(hf) + 1e-6)).max():.3e}, "
          f"normalised err {rel:.3e}")
    print(f"argmax agreement {np.mean(ours.argmax(-1) == hf.argmax(-1)):.4f}")
    if not rel <= args.tol:
        print(f"FAIL: normalised error above {args.tol}")
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
