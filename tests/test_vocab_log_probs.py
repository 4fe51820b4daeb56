"""course_lib.vocab_log_probs: one pass over the vocabulary gives log_softmax's values and gradients."""

from __future__ import annotations

import pytest
import torch

from course_lib.vocab_log_probs import chunk_rows, vocab_log_probs


def reference(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])  # 7 and 64 do not divide V = 300: a ragged last chunk
def test_values_and_gradients_match_log_softmax(with_bias, chunk):
    g = torch.Generator().manual_seed(0)
    V, H, M = 300, 16, 9
    weight = torch.randn(V, H, generator=g) * 3  # large logits: the running max must matter
    bias = torch.randn(V, generator=g) if with_bias else None
    targets = torch.tensor([0, 299, 150, 7, 8, 64, 65, 298, 1])  # first and last chunk included
    h1 = torch.randn(M, H, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    upstream = torch.randn(M, generator=g)
    ours = vocab_log_probs(h1, weight, bias, targets, chunk)
    ref = reference(h2, weight, bias, targets)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    assert ours.dtype == torch.float32 and (ours <= 0).all()


def test_without_grad_gives_the_same_values():
    g = torch.Generator().manual_seed(1)
    weight, hidden = torch.randn(50, 8, generator=g), torch.randn(4, 8, generator=g)
    targets = torch.tensor([3, 49, 0, 10])
    with torch.no_grad():
        torch.testing.assert_close(vocab_log_probs(hidden, weight, None, targets, 16), reference(hidden, weight, None, targets))


def test_a_trainable_output_layer_is_refused():
    weight = torch.randn(20, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        vocab_log_probs(torch.randn(2, 4), weight, None, torch.tensor([1, 2]))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[M, H\]"):
        vocab_log_probs(torch.randn(2, 3, 4), torch.randn(20, 4), None, torch.tensor([1, 2]))


def test_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    weight, hidden = torch.randn(100, 8, generator=g), torch.randn(3, 8, generator=g)
    targets = torch.tensor([5, 50, 99])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vocab_log_probs(hidden, weight, None, targets, 32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(hidden, weight, None, targets), atol=1e-5, rtol=1e-5)


def test_chunks_fit_a_cpu_cache():
    assert chunk_rows(torch.empty(262144, 640)) == 1638
    assert chunk_rows(torch.empty(10, 100_000)) == 256  # never fewer rows than that
