// The conventions every layer of every stage follows. Written once, here.
//
// 1. Layer functions follow llm.c:
//      <layer>_forward (out, saved..., in, params..., dims)
//      <layer>_backward(dparams..., din, dout, saved..., in, params..., dims)
// 2. PARAMETER gradients ACCUMULATE (+=): a weight used twice (shared embedding, MTP head) simply
//    receives both contributions; zero them once per step. ACTIVATION gradients OVERWRITE (=).
// 3. Tensors are row-major; the last index is contiguous. Every file opens with a shape legend:
//      B batch, T time, N = B*T rows, D model width, H heads, Dq q rank (q_lora_rank),
//      Dc kv rank (kv_lora_rank), Dn nope dim (qk_nope_head_dim), Dr rope dim (qk_rope_head_dim),
//      Dv value dim (v_head_dim), E routed experts, Es shared experts, K active experts,
//      F expert width, V vocab.
// 4. dsv3::cpu:: and dsv3::cuda:: entry points have identical signatures. CPU pointers are host memory,
//    CUDA pointers are device memory. CPU functions are templates on the scalar type so gradchecks run
//    in double; CUDA functions are float (fp32) unless their name says otherwise.
// 5. CUDA entry points run on the default stream and return without synchronising.
#pragma once
