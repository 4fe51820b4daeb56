"""log p(token) under a frozen output layer, in one pass over the vocabulary.

Training needs, at each read position, the log-probability of one token: its logit minus the
log-sum-exp of all V logits. Computing the [M, V] logits and a log_softmax reads the output matrix
W [V, H] twice (forward, then backward for dL/dh = W[t] - softmax @ W), and with M a few dozen
rows those reads, not the FLOPs, are the cost: Gemma-3's table is 262,144 x 640 (671 MB in fp32),
and its two reads took 230 ms of a 790 ms training step on 2 CPU cores.

Here W is read once, in chunks small enough to stay in cache. Each chunk's logits update a running
max and sum of exponentials (the online softmax of flash attention) and, when a gradient is wanted,
a running softmax-weighted sum of W's rows: the expectation E_p[W] that the backward pass needs.
The [M, V] logits never exist, so memory no longer grows with the vocabulary either. Liger
Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy do the same on GPUs.
"""

from __future__ import annotations

import torch

# Bytes of W per chunk: small enough for a CPU's cache (2,048 rows of Gemma's 640-wide table were
# fastest in a sweep of 1k-16k rows on 2 EPYC cores); on a GPU, few and large chunks (launch overhead).
CHUNK_BYTES = {"cpu": 4 << 20}
DEFAULT_CHUNK_BYTES = 256 << 20


def chunk_rows(weight: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(weight.device.type, DEFAULT_CHUNK_BYTES)
    return max(256, budget // (weight.shape[1] * 4))


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("vocab_log_probs: the output layer must be frozen (no gradient for its weight or bias)")
        want_grad = ctx.needs_input_grad[0]
        M, V = hidden.shape[0], weight.shape[0]
        running_max = hidden.new_full((M, 1), -float("inf"))
        running_sum = hidden.new_zeros((M, 1))
        expected = hidden.new_zeros(hidden.shape) if want_grad else None
        for lo in range(0, V, chunk):
            w = weight[lo : lo + chunk].float()
            logits = hidden @ w.T
            if bias is not None:
                logits += bias[lo : lo + chunk].float()
            new_max = torch.maximum(running_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            e = logits.sub_(new_max).exp_()
            running_sum.mul_(rescale).add_(e.sum(1, keepdim=True))
            if expected is not None:
                expected.mul_(rescale).addmm_(e, w)
            running_max = new_max
        gold = weight[targets].float()
        target_logits = (hidden * gold).sum(1)
        if bias is not None:
            target_logits = target_logits + bias[targets].float()
        if want_grad:
            ctx.save_for_backward(expected / running_sum, gold)
        return target_logits - (running_max + running_sum.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        expected, gold = ctx.saved_tensors
        return grad[:, None] * (gold - expected), None, None, None, None


def vocab_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[m, targets[m]] for each row m: [M], in fp32.

    ``hidden`` [M, H] may require grad; ``weight`` [V, H] and ``bias`` [V] must not (a frozen model).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"vocab_log_probs: hidden must be [M, H] and targets [M], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    # fp32 whatever the autocast: the running sums of exponentials lose too much in bf16.
    with torch.autocast(hidden.device.type, enabled=False):
        return _TokenLogProbs.apply(hidden.float(), weight, bias, targets.to(hidden.device), chunk or chunk_rows(weight))
