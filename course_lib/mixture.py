"""Mixtures of prompts: K prompts per relation, weights learned by EM, answers ensembled.

The model of the paper: p(y | x) = sum_k pi_k p_k(y | x), where p_k is the answer distribution of
prompt k (hard or soft). Treating "which prompt" as a latent variable gives EM:

* E step: each training fact's responsibilities r_k = pi_k p_k(y | x) / sum_j pi_j p_j(y | x);
* M step: pi_k = the mean responsibility over the training facts (closed form), and a gradient
  step on the prompts' offsets for the responsibility-weighted log-loss sum_k r_k log p_k(y | x).

The data-dependent variant lets the weights depend on the subject too,
pi_k(x) proportional to pi_k p_k(x), where p_k(x) is how plausible the model finds the subject in
prompt k's subject slot (``ClozeLM.subject_log_likelihood``): a prompt that reads naturally with
this subject gets more say.
"""

from __future__ import annotations

import math

import torch


def responsibilities(log_weights: torch.Tensor, gold_log_probs: torch.Tensor) -> torch.Tensor:
    """E step: r[b, k] = posterior of prompt k for fact b; ``log_weights`` is [K] or [B, K]."""
    return torch.softmax(log_weights + gold_log_probs, dim=-1)


def mixture_log_likelihood(log_weights: torch.Tensor, gold_log_probs: torch.Tensor) -> torch.Tensor:
    """log sum_k pi_k p_k(y | x), per fact: the quantity EM never decreases."""
    return torch.logsumexp(torch.log_softmax(log_weights, dim=-1) + gold_log_probs, dim=-1)


def m_step_weights(resp_sum: torch.Tensor, n_facts: int, floor: float = 1e-8) -> torch.Tensor:
    """M step for the weights: log of the mean responsibility (floored so no prompt dies for good)."""
    pi = resp_sum / max(n_facts, 1)
    pi = pi.clamp_min(floor)
    return torch.log(pi / pi.sum())


def em_step(log_weights: torch.Tensor, gold_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One EM update of the weights on a fixed batch: (new log-weights, responsibilities)."""
    r = responsibilities(torch.log_softmax(log_weights, dim=-1), gold_log_probs)
    return m_step_weights(r.sum(0), r.shape[0]), r


def data_dependent_log_weights(log_weights: torch.Tensor, subject_log_likelihood: torch.Tensor) -> torch.Tensor:
    """log pi_k(x) for each fact: prior weights times each prompt's plausibility of the subject.

    ``subject_log_likelihood`` is [B, K]. Normalising over k turns p_k(x) into a posterior over
    prompts given the subject alone.
    """
    return torch.log_softmax(torch.log_softmax(log_weights, dim=-1) + subject_log_likelihood, dim=-1)


def effective_prompts(log_weights: torch.Tensor) -> float:
    """exp(entropy of the weights): K for uniform weights, 1 when one prompt takes everything."""
    p = torch.softmax(log_weights.double(), dim=-1)
    return math.exp(float(-(p * torch.log(p.clamp_min(1e-300))).sum()))
