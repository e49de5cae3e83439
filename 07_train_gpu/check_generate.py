#!/usr/bin/env python3
"""Outside check of stage 07's sampler: our greedy continuations against Hugging Face transformers'
`generate(do_sample=False)` on the same checkpoint (fp32, TF32 off), token for token, and transformers' decode
speed (static cache) at batch 1 and 16 beside ours. Optional: needs PyTorch and transformers (the GPU machine has
them); never part of the build or the test suite.

    build/07_train_gpu/07_train_gpu sample --checkpoint RUN/checkpoints/best --temperature 0 \\
        --max-new-tokens 100 --print-ids > out/ours.txt           # the three fixed prompts, GPU (or --device cpu)
    python3 07_train_gpu/check_generate.py --checkpoint RUN/checkpoints/best --ours out/ours.txt

Reads the "ids: PROMPT | NEW" lines of our output, generates max(len(NEW)) tokens from each prompt with
transformers, prints both id lists and the first difference, and exits 1 unless every continuation is equal. The
routing biases are shifted to a minimum of 0 first (06_full_model/check_transformers.py says why: transformers masks
dropped expert groups with 0 where DeepSeek uses -inf; a uniform shift per layer changes none of our choices).
Our eos token ends our sample early; transformers (told of no eos) is then compared up to and including it.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "06_full_model"))
from check_transformers import load_model  # noqa: E402  (the one loader of our checkpoints into transformers)


def read_ours(path):
    runs = []
    for line in open(path):
        if line.startswith("ids: "):
            prompt, new = line[len("ids: "):].split("|")
            runs.append(([int(x) for x in prompt.split()], [int(x) for x in new.split()]))
    return runs


def shift_biases(model):
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    if not biases:
        biases = [p for n, p in model.named_parameters() if n.endswith("e_score_correction_bias")]
    with torch.no_grad():
        for b in biases:
            b.sub_(b.min())
    return len(biases)


def generate(model, ids, new, device, batch=1, cache=None):
    x = torch.tensor([ids] * batch, dtype=torch.long, device=device)
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        out = model.generate(x, **kw)
    return out[:, len(ids):].tolist()


def timed(model, ids, new, device, batch, cache, repeats):
    generate(model, ids, new, device, batch, cache)  # warm-up (compilation, cache allocation)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate(model, ids, new, device, batch, cache)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="the checkpoint folder our samples came from")
    ap.add_argument("--ours", required=True, help="output of `07_train_gpu sample --temperature 0 --print-ids`")
    ap.add_argument("--speed-tokens", type=int, default=100, help="new tokens per timed generate (0: no timing)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per figure (median)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runs = read_ours(args.ours)
    if not runs:
        print(f"FAIL: no 'ids:' line in {args.ours} (run sample with --print-ids)")
        return 1
    model = load_model(args.checkpoint, device)
    nb = shift_biases(model)
    model.generation_config.eos_token_id = None  # fixed lengths: ours stops at eos, compared up to and including it
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device}, {nb} routing biases "
          f"shifted to min 0")
    failures = 0
    for i, (prompt, ours) in enumerate(runs):
        hf = generate(model, prompt, len(ours), device)[0]
        first = next((k for k in range(len(ours)) if ours[k] != hf[k]), None)
        print(f"prompt {i}: ids {prompt}")
        print(f"  ours         ({len(ours)}): {' '.join(map(str, ours))}")
        print(f"  transformers ({len(hf)}): {' '.join(map(str, hf))}")
        if first is None:
            print(f"  equal: {len(ours)} of {len(ours)} tokens")
        else:
            failures += 1
            print(f"  DIFFER from new token {first} on: ours {ours[first]}, transformers {hf[first]}")
    print(f"greedy continuations equal to transformers: {len(runs) - failures} of {len(runs)}")
    if args.speed_tokens > 0 and device == "cuda":
        prompt = runs[0][0]
        print(f"transformers generate speed, greedy, {args.speed_tokens} new tokens after prompt 0 "
              f"(median of {args.repeats}):")
        for cache in (None, "static"):
            for batch in (1, 16):
                s = timed(model, prompt, args.speed_tokens, device, batch, cache, args.repeats)
                print(f"  cache {cache or 'default':8s} batch {batch:2d}: {s:.3f} s, "
                      f"{batch * args.speed_tokens / s:.0f} tokens/s in all")
    print("ok" if failures == 0 else "FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
