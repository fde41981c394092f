"""Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018): the
user-based autoencoder (AE) teacher."""

from __future__ import annotations


import scipy.sparse as sp
import torch
from torch import nn

from hetcomp.models.base import Recommender
from hetcomp.models.sampling import csr_tensors, gather_rows
from hetcomp.registry import MODELS


@MODELS.register("vae")
class MultVAE(Recommender):
    """Encoder [n_items -> hidden -> 2 x latent] (tanh), decoder [latent -> hidden -> n_items] (tanh).

    Args:
        hidden: width of the hidden layer of encoder and decoder (600 in the paper).
        latent: latent size (200 in the paper).
        batch_size: users per batch.
        dropout: input dropout on the L2-normalised training row.
        beta_max: KL weight cap; the weight grows by ``beta_max / total_anneal_steps`` per step.
        total_anneal_steps: optimiser steps to reach ``beta_max``.

    A batch is the users of one shuffled chunk plus every random draw of the step (kept input
    entries and the reparametrisation noise), drawn with the epoch generator on the CPU, so a
    seed gives identical batches on every device. The input layer is an ``embedding_bag`` over
    the (kept) training items, never a dense row. Loss per user: ``-sum_{i in row} log_softmax(z)_i
    + beta * KL``, averaged over the batch. ``score(users)`` is the decoder logits of the users'
    full (no dropout) training rows with z = mu.
    """

    def __init__(self, n_users: int, n_items: int, hidden: int = 600, latent: int = 200,
                 batch_size: int = 512, dropout: float = 0.5, beta_max: float = 0.2,
                 total_anneal_steps: int = 2000):
        super().__init__(n_users, n_items)
        self.hidden = hidden
        self.latent = latent
        self.batch_size = batch_size
        self.dropout = dropout
        self.beta_max = beta_max
        self.total_anneal_steps = total_anneal_steps
        self.encoder_in = nn.EmbeddingBag(n_items, hidden, mode="sum")
        self.encoder_bias = nn.Parameter(torch.zeros(hidden))
        self.encoder_out = nn.Linear(hidden, 2 * latent)
        self.decoder_hidden = nn.Linear(latent, hidden)
        self.decoder_out = nn.Linear(hidden, n_items)
        for weight in (self.encoder_in.weight, self.encoder_out.weight, self.decoder_hidden.weight,
                       self.decoder_out.weight):
            nn.init.xavier_uniform_(weight)
        for bias in (self.encoder_out.bias, self.decoder_hidden.bias, self.decoder_out.bias):
            nn.init.normal_(bias, std=0.001)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.device = torch.device("cpu")
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows_cpu: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, train: sp.csr_matrix, device: torch.device) -> None:
        self.device = torch.device(device)
        self.to(self.device)
        self._rows_cpu = csr_tensors(train, torch.device("cpu"))
        self._rows = csr_tensors(train, self.device)

    def _need_setup(self):
        if self._rows is None:
            raise RuntimeError("call setup(train, device) before using Mult-VAE")

    def epoch_batches(self, epoch, generator):
        self._need_setup()
        indptr, indices = self._rows_cpu
        has_items = torch.nonzero(indptr[1:] > indptr[:-1]).squeeze(1)
        order = has_items[torch.randperm(len(has_items), generator=generator)]
        for start in range(0, len(order), self.batch_size):
            users = order[start:start + self.batch_size]
            items, offsets, counts = gather_rows(indptr, indices, users)
            keep = torch.rand(len(items), generator=generator) >= self.dropout
            noise = torch.randn(len(users), self.latent, generator=generator)
            yield tuple(t.to(self.device) for t in (users, items, offsets, counts, keep, noise))

    def _encode(self, items, offsets, weights):
        hidden = torch.tanh(self.encoder_in(items, offsets, per_sample_weights=weights) + self.encoder_bias)
        stats = self.encoder_out(hidden)
        return stats[:, : self.latent], stats[:, self.latent:]

    def _decode(self, z):
        return self.decoder_out(torch.tanh(self.decoder_hidden(z)))

    def beta(self) -> float:
        return min(self.beta_max, self.beta_max * float(self.steps) / max(1, self.total_anneal_steps))

    def loss(self, batch) -> torch.Tensor:
        users, items, offsets, counts, keep, noise = batch
        # L2-normalised row, then dropout with 1/(1-p) rescaling of the kept entries.
        norm = torch.repeat_interleave(counts.float().rsqrt(), counts, output_size=len(items))
        weights = norm * keep.float() / (1.0 - self.dropout)
        mu, logvar = self._encode(items, offsets, weights)
        z = mu + noise * torch.exp(0.5 * logvar)
        logits = self._decode(z)
        rows = torch.repeat_interleave(torch.arange(len(users), device=items.device), counts,
                                       output_size=len(items))
        log_lik = logits[rows, items].sum() - (torch.logsumexp(logits, 1) * counts).sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum()
        beta = self.beta()
        if self.training:
            self.steps += 1
        return (-log_lik + beta * kl) / len(users)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        self._need_setup()
        indptr, indices = self._rows
        items, offsets, counts = gather_rows(indptr, indices, users.to(indptr.device))
        norm = torch.repeat_interleave(counts.float().clamp(min=1).rsqrt(), counts, output_size=len(items))
        mu, _ = self._encode(items, offsets, norm)
        return self._decode(mu)
