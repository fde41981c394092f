"""HetComp (Kang et al., "Distillation from Heterogeneous Models for Top-K Recommendation", WWW 2023).

Follows the official code's algorithm (docs/METHOD.md, "HetComp"); see ``HetComp``. Its ablations
(docs/METHOD.md, "Ablations") are the same class with other default switches, registered under
the names of ``ABLATIONS``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hetcomp.distill.base import Distiller
from hetcomp.distill.dkc import DynamicKnowledgeConstruction, ensemble_topk, factorized_top_unobserved
from hetcomp.distill.list_scores import list_scores
from hetcomp.distill.losses import (RowExclusions, Workspace, factorized_rest_log_mass, overall_loss,
                                    plackett_luce, prefix_log_rest, rank_loss, rest_log_mass)
from hetcomp.errors import HetCompError
from hetcomp.evaluation import top_unobserved
from hetcomp.models.sampling import gather_rows
from hetcomp.registry import METHODS

log = logging.getLogger(__name__)

#: HetComp's ablations: registered name -> (switches over ``HetComp.defaults``, what changes).
ABLATIONS = {
    "hetcomp_nodkc": ({"dkc": False, "switch_epoch": 120},
                      "no DKC: the final ensemble's targets from the start, phase 2 after epoch 120"),
    "hetcomp_phase1": ({"loss": "overall"}, "phase-1 (overall) loss only, DKC as usual"),
    "hetcomp_phase2": ({"loss": "rank"}, "phase-2 (ranking) loss only from epoch 0, DKC as usual"),
    "hetcomp_nosep": ({"separate_observed": False},
                      "no observed/unobserved separation: one merged list, training items in the rest mass"),
}


def register_ablations(cls):
    """Register, under each name of ``ABLATIONS``, a subclass of ``cls`` that only changes ``defaults``."""
    for name, (switches, summary) in ABLATIONS.items():
        unknown = sorted(set(switches) - set(cls.defaults))
        if unknown:
            raise ValueError(f"ablation {name}: unknown switch(es) {unknown}")
        variant = type(f"{cls.__name__}_{name.removeprefix('hetcomp_')}", (cls,),
                       {"defaults": {**cls.defaults, **switches}, "__module__": cls.__module__,
                        "__doc__": f"HetComp ablation ({name}): {summary}."})
        METHODS.register(name)(variant)
    return cls


def merged_rank_loss(observed_scores: torch.Tensor, observed_mask: torch.Tensor, top_scores: torch.Tensor,
                     log_rest: torch.Tensor, prefixes, log_floor: float | None = 1e-5) -> torch.Tensor:
    """Phase-2 loss without the observed/unobserved separation, summed over rows.

    ``mean_m PL([P, T[:m]]; Z(M) + sum_{j in T[m:]} e^{s_j})`` over ``m`` in ``prefixes``, where
    ``log_rest [B]`` is ``log Z(M)``, the mass of every item outside the merged list ``M = [P, T]``
    (training items outside ``P`` included). Padded observed entries (``observed_mask`` False)
    add neither a term nor mass.
    """
    n_obs = observed_scores.shape[1]
    mask = torch.cat([observed_mask, torch.ones_like(top_scores, dtype=torch.bool)], 1)
    total = sum(plackett_luce(torch.cat([observed_scores, top_scores[:, :m]], 1),
                              prefix_log_rest(top_scores, log_rest, m), mask[:, :n_obs + m], log_floor)
                for m in prefixes)
    return (total / len(prefixes)).sum()


@register_ablations
@METHODS.register("hetcomp")
class HetComp(Distiller):
    """HetComp: dynamic knowledge construction + adaptive knowledge transfer, KD loss only.

    **Knowledge.** ``idx[x, u]`` selects a checkpoint of teacher ``x`` for user ``u``; it starts at
    0 for every pair (the initial knowledge is the ensemble of every teacher's first checkpoint).
    The unobserved target list ``T_u`` is the top-``top_k`` (100) of the rank-importance ensemble
    (``hetcomp.knowledge.combine_rankings``) of the selected lists. The observed list ``P_u`` is
    the first ``n_observed`` (10) columns of ``knowledge.observed`` (the user's training items
    ranked by the final ensemble) and is fixed for the whole run.

    **Training.** Each BPR batch of ``batch_size`` (1,024) training interactions is reduced to its
    unique users ``B`` (``torch.unique``); the BPR loss itself is not used (as in the official
    code, the only training signal is KD). For ``B`` the student's scores over all items, clamped to
    ``[-score_clamp, score_clamp]`` ([-40, 40]), give

    - phase 1: ``overall_weight`` (0.01) x ``L_overall`` (``losses.overall_loss``), every item of
      ``[P_u, T_u]`` against the rest mass ``Z_u(T_u)``;
    - phase 2: ``rank_weight`` (0.005) x ``L_rank`` (``losses.rank_loss``) with
      ``rank_prefixes`` (50, 10).

    Losses are summed over users and items. Training items never enter a rest mass.

    **DKC** (``hetcomp.distill.dkc``) runs after epochs ``p, 2p, ...`` (``dkc_period`` p = 10)
    until the knowledge is final, on the student's top-``dkc_depth`` (50) non-training ranking;
    ``T_u`` is then rebuilt for the users whose selection moved. The knowledge is final once
    ``sum_x v_bar[x] >= T * (C - 1)`` with ``v_bar[x] = round(mean_u idx[x, u], 2)`` (the official
    ``18 = 6 x 3`` for 6 teachers with 4 checkpoints): DKC stops and phase 2 starts from the next
    epoch.

    **Choices the official code leaves open** (docs/METHOD.md, "Open choices"; also in
    ``config/methods/hetcomp.yaml``):

    - observed-list padding: ``knowledge.observed`` rows are padded with ``-1`` by
      ``build-ensemble``; padded entries are masked out (no loss term, no mass) in both phases;
    - the DKC ratio divides by ``max(d_next, dkc_eps)`` (1e-12; the official code has no guard),
      so ``d_next = 0`` advances the pair;
    - scores are clamped to ``[-40, 40]`` as in the official code (the clamp's gradient is zero
      outside), but the losses are computed in log space (no exp-sum then log); the official
      ``1e-5`` floor on each log argument is kept (``log_floor``, null disables it);
    - ``rank_prefixes`` generalises the official ``1/2 [PL(T[:50]) + PL(T[:10])]`` to the mean over
      the prefixes; the observed list competes with the rest of the first prefix;
    - the DKC's student ranking is computed afresh after the epoch (the official code reuses the
      ranking of the evaluation at the same epoch: the same model state when ``eval_every`` and
      ``dkc_period`` agree);
    - ``T_u`` ties (items with equal ensemble score) are ordered by item id
      (``dkc.ensemble_topk``; ``combine_rankings`` leaves them to ``torch.topk``), and
      ``v_bar`` is rounded with ``numpy.round``.

    **Ablation switches** (all off in ``hetcomp``; see ``ABLATIONS``):

    - ``dkc: false``: every (teacher, user) pair sits at the final checkpoint from the start (the
      targets are the final ensemble's top-``top_k``) and DKC never runs; the adaptive loss then
      moves to phase 2 after epoch ``switch_epoch`` (required in that case);
    - ``loss``: ``adaptive`` (phase 1, then phase 2 once DKC has reached the final checkpoints),
      ``overall`` (phase-1 loss only) or ``rank`` (phase-2 loss only, from epoch 0). DKC runs
      in every mode until the selection is final (the same ``v_bar`` rule);
    - ``separate_observed: false``: one merged list ``M_u = [P_u, T_u]`` (observed first) and no
      special status for training items: every rest mass is over the items outside the list,
      training items outside ``P_u`` included; phase 1 puts each item of ``M_u`` against
      ``Z(M_u)``, phase 2 is the mean over the prefixes ``m`` of ``PL([P_u, T_u[:m]]; Z)``, so
      observed items must rank above the unobserved targets (``merged_rank_loss``).

    ``method_state`` holds the final selection (counts per checkpoint and mean index per teacher),
    the phase, the switch epoch and the DKC epochs; the student itself ends in its best state.
    """

    defaults = {
        "top_k": 100,
        "n_observed": 10,
        "rank_prefixes": [50, 10],
        "overall_weight": 0.01,
        "rank_weight": 0.005,
        "alpha": 1.05,
        "alpha_decay": 0.995,
        "dkc_period": 10,
        "dkc_depth": 50,
        "dkc_eps": 1e-12,
        "score_clamp": 40.0,
        "log_floor": 1e-5,
        "floor_on": "denominator",
        # ablation switches (the full method: dkc true, adaptive loss, separate lists)
        "dkc": True,
        "switch_epoch": None,
        "loss": "adaptive",
        "separate_observed": True,
    }

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if knowledge is None:
            raise HetCompError("hetcomp distils teacher knowledge: give --ensemble DIR")
        cfg = {**self.defaults, **(config or {})}
        self.cfg = cfg
        self.device = torch.device(device)
        n_teachers, n_checkpoints, n_users, depth = knowledge.trajectories.shape
        if n_users != split.n_users or knowledge.n_items != split.n_items:
            raise HetCompError(
                f"ensemble has {n_users} users x {knowledge.n_items} items but the split has "
                f"{split.n_users} x {split.n_items}: built from another split?")
        self.top_k = int(cfg["top_k"])
        if not 1 <= self.top_k <= split.n_items:
            raise HetCompError(f"hetcomp: top_k must be in [1, {split.n_items}], got {self.top_k}")
        self.prefixes = [int(m) for m in cfg["rank_prefixes"]]
        if not self.prefixes or any(m < 1 for m in self.prefixes):
            raise HetCompError(f"hetcomp: rank_prefixes must be positive lengths, got {cfg['rank_prefixes']}")
        self.period = int(cfg["dkc_period"])
        if self.period < 1:
            raise HetCompError("hetcomp: dkc_period must be >= 1")
        self.clamp = None if cfg["score_clamp"] is None else float(cfg["score_clamp"])
        self.log_floor = None if cfg["log_floor"] is None else float(cfg["log_floor"])
        self.floor_on = str(cfg["floor_on"])
        if self.floor_on not in ("denominator", "ratio"):
            raise HetCompError(f"hetcomp: floor_on must be 'denominator' or 'ratio', got {self.floor_on!r}")
        self.weights = {"overall": float(cfg["overall_weight"]), "rank": float(cfg["rank_weight"])}
        self.use_dkc, self.separate = cfg["dkc"], cfg["separate_observed"]
        if not isinstance(self.use_dkc, bool) or not isinstance(self.separate, bool):
            raise HetCompError("hetcomp: dkc and separate_observed must be true or false")
        self.loss_mode = str(cfg["loss"])
        if self.loss_mode not in ("adaptive", "overall", "rank"):
            raise HetCompError(f"hetcomp: loss must be 'adaptive', 'overall' or 'rank', got {self.loss_mode!r}")
        fixed_switch = not self.use_dkc and self.loss_mode == "adaptive"
        if fixed_switch != (cfg["switch_epoch"] is not None):
            raise HetCompError("hetcomp: switch_epoch is needed exactly when dkc is false and loss is adaptive")
        switch_epoch = cfg["switch_epoch"]
        if fixed_switch and (isinstance(switch_epoch, bool) or not isinstance(switch_epoch, int) or switch_epoch < 0):
            raise HetCompError(f"hetcomp: switch_epoch must be an epoch (an integer >= 0), got {switch_epoch!r}")
        self.fixed_switch = switch_epoch

        self.dkc = DynamicKnowledgeConstruction(
            knowledge.trajectories, depth=int(cfg["dkc_depth"]), alpha=float(cfg["alpha"]),
            decay=float(cfg["alpha_decay"]), period=self.period, eps=float(cfg["dkc_eps"]))
        if not self.use_dkc:                     # the final ensemble's knowledge from the start
            self.dkc.idx.fill_(self.dkc.last)
        self.targets = self._ensemble(np.arange(n_users)).to(self.device)              # [U, K]
        n_obs = int(cfg["n_observed"])
        observed = np.full((n_users, n_obs), -1, dtype=np.int64)
        take = min(n_obs, knowledge.observed.shape[1])
        observed[:, :take] = knowledge.observed[:, :take]
        self.observed = torch.from_numpy(observed).to(self.device)                     # [U, L], -1 padded
        train = split.train.tocsr()
        self.train_indptr = torch.from_numpy(train.indptr.astype(np.int64)).to(self.device)
        owners = torch.repeat_interleave(torch.arange(n_users, device=self.device), self.train_indptr.diff())
        self.train_flat = owners * split.n_items + torch.from_numpy(train.indices.astype(np.int64)).to(self.device)
        self._build_exclusions()
        self.factorized = hasattr(student, "user_emb") and hasattr(student, "item_emb")
        self.workspace = Workspace()

        self.phase = 2 if self.loss_mode == "rank" else 1
        self.switch_epoch: int | None = None
        self.dkc_epochs: list[int] = []
        self.dkc_seconds: list[float] = []
        self._evaluated = False

    # -- knowledge ---------------------------------------------------------------------------
    def _ensemble(self, users: np.ndarray) -> torch.Tensor:
        """Top-``top_k`` of the ensemble of the currently selected lists, for ``users`` (int64).

        ``knowledge.selected_lists(idx)`` restricted to ``users``, ranked like
        ``hetcomp.knowledge.combine_rankings`` (``dkc.ensemble_topk``: same scores, candidates only).
        """
        knowledge = self.knowledge
        idx = self.dkc.idx.numpy()[:, users]
        lists = np.stack([knowledge.trajectories[t, idx[t], users] for t in range(knowledge.n_teachers)])
        return ensemble_topk(lists, knowledge.n_items, self.top_k, knowledge.temperature)

    def _build_exclusions(self) -> None:
        """Every user's items outside the rest mass, sorted, as a CSR over users
        (``exclusion_indptr``, ``exclusion_items``): the training items and ``T_u``, or without the
        separation the merged list ``[P_u, T_u]``. Rebuilt whenever the targets change."""
        n_users, n_items = self.split.n_users, self.split.n_items
        users = torch.arange(n_users, device=self.device).unsqueeze(1)
        if self.separate:
            keys = torch.cat([self.train_flat, (users * n_items + self.targets).flatten()])
        else:   # padded observed entries repeat a target
            listed = torch.cat([torch.where(self.observed >= 0, self.observed, self.targets[:, :1]),
                                self.targets], 1)
            keys = (users * n_items + listed).flatten()
        keys = torch.sort(keys).values
        self.exclusion_indptr = torch.searchsorted(keys, torch.arange(n_users + 1, device=self.device) * n_items)
        self.exclusion_items = keys % n_items

    def _exclusions(self, users: torch.Tensor) -> RowExclusions:
        """The excluded items of ``users`` (row = position in ``users``), gathered from the CSR."""
        items, offsets, counts = gather_rows(self.exclusion_indptr, self.exclusion_items, users)
        return RowExclusions(torch.cat([offsets, offsets.new_tensor([len(items)])]), items)

    # -- training ----------------------------------------------------------------------------
    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        users = torch.unique(batch[0])
        n_items = self.split.n_items
        targets = self.targets[users]                                  # [B, K]
        observed = self.observed[users]                                # [B, L]
        observed_mask = observed >= 0
        exclude = self._exclusions(users)
        if self.factorized:
            user_table, item_table = self.student.user_emb.weight, self.student.item_emb.weight
            log_rest = factorized_rest_log_mass(self.student.user_emb(users), item_table, exclude, self.clamp,
                                                self.workspace)
            scores = list_scores(user_table, item_table, users, torch.cat([observed.clamp(min=0), targets], 1))
            if self.clamp is not None:
                scores = scores.clamp(-self.clamp, self.clamp)
        else:  # any other student: the full score matrix through autograd
            full = self.student.score(users)
            if self.clamp is not None:
                full = full.clamp(-self.clamp, self.clamp)
            log_rest = rest_log_mass(full, exclude.flat(n_items))
            scores = full.gather(1, torch.cat([observed.clamp(min=0), targets], 1))
        n_obs = observed.shape[1]
        if self.phase == 1:
            mask = torch.cat([observed_mask, torch.ones_like(targets, dtype=torch.bool)], 1)
            loss = overall_loss(scores, mask, log_rest, self.log_floor, self.floor_on)
            return {"overall": self.weights["overall"] * loss}
        rank = rank_loss if self.separate else merged_rank_loss
        loss = rank(scores[:, :n_obs], observed_mask, scores[:, n_obs:], log_rest, self.prefixes, self.log_floor)
        return {"rank": self.weights["rank"] * loss}

    def on_evaluation(self, epoch: int) -> None:
        self._evaluated = True

    def after_epoch(self, epoch: int) -> dict:
        trained_phase = self.phase
        record: dict = {}
        dkc_due = epoch >= self.period and epoch % self.period == 0
        # DKC runs until the knowledge is final (with one checkpoint: once, as the official loop)
        if self.use_dkc and dkc_due and not (self.dkc_epochs and self.knowledge_final()):
            record["dkc"] = self.run_dkc(epoch)
        elif self.fixed_switch is not None and self.phase == 1 and epoch >= self.fixed_switch:
            self._switch(epoch)
        if self._evaluated or record:
            self._evaluated = False
            record["phase"] = trained_phase
            record["selection"] = self.selection_means()
            if self.switch_epoch == epoch:
                record["switched_to_phase2"] = True
        return record

    @torch.no_grad()
    def run_dkc(self, epoch: int) -> dict:
        """One DKC call: update the selection, rebuild the targets that moved, maybe switch phase."""
        started = time.perf_counter()
        was_training = self.student.training
        self.student.train(False)
        try:
            if self.factorized:
                student_top = factorized_top_unobserved(
                    self.student.user_emb.weight, self.student.item_emb.weight, self.train_indptr,
                    self.train_flat, self.dkc.depth).cpu()
            else:
                student_top = torch.from_numpy(top_unobserved(
                    self.student.score, self.split.train, self.dkc.depth, device=self.device))
        finally:
            self.student.train(was_training)
        first = self.dkc.last_d is None
        advanced, d = self.dkc.step(epoch, student_top)
        moved = np.flatnonzero(advanced.any(0).numpy())
        if len(moved):
            self.targets[torch.from_numpy(moved).to(self.device)] = self._ensemble(moved).to(self.device)
            self._build_exclusions()
        if self.knowledge_final() and self.loss_mode == "adaptive":
            self._switch(epoch)
        self.dkc_epochs.append(epoch)
        seconds = time.perf_counter() - started
        self.dkc_seconds.append(seconds)
        teachers = self.knowledge.teachers
        return {
            "first_call": first,
            "advanced": round(float(advanced.to(torch.float64).mean()), 4),
            "users_rebuilt": int(len(moved)),
            "threshold": round(self.dkc.threshold(epoch), 6),
            "discrepancy": {name: [round(float(v), 4) for v in d[t].mean(1)] for t, name in enumerate(teachers)},
            "seconds": round(seconds, 3),
        }

    def knowledge_final(self) -> bool:
        """The official end of DKC: ``sum_x v_bar[x] >= T * (C - 1)``, ``v_bar`` rounded to 2 decimals."""
        v_bar = np.round(self.dkc.mean_selection(), 2)
        return bool(v_bar.sum() >= self.dkc.n_teachers * self.dkc.last)

    def _switch(self, epoch: int) -> None:
        self.phase = 2
        self.switch_epoch = epoch
        log.info("hetcomp: switching to the ranking loss after epoch %d", epoch)

    def selection_means(self) -> dict[str, float]:
        """Mean selected checkpoint index (0 .. C-1) per teacher."""
        return {name: round(float(v), 4) for name, v in zip(self.knowledge.teachers, self.dkc.mean_selection())}

    def method_state(self) -> dict:
        counts = self.dkc.counts()
        return {
            "teachers": list(self.knowledge.teachers),
            "n_checkpoints": self.dkc.n_checkpoints,
            "selection_mean": self.selection_means(),
            "selection_counts": {name: counts[t].tolist() for t, name in enumerate(self.knowledge.teachers)},
            "phase": self.phase,
            "switch_epoch": self.switch_epoch,
            "dkc_epochs": self.dkc_epochs,
            "dkc_seconds_mean": round(float(np.mean(self.dkc_seconds)), 3) if self.dkc_seconds else None,
            "config": self.cfg,
        }

    # -- resuming (hetcomp.checkpoint) -------------------------------------------------------
    def extra_state(self) -> dict:
        """The DKC selection (``idx``, ``last_d``, calls), the targets built from it, the phase,
        the switch epoch and the DKC log."""
        return {"idx": self.dkc.idx, "last_d": self.dkc.last_d, "calls": self.dkc.calls,
                "targets": self.targets, "phase": self.phase, "switch_epoch": self.switch_epoch,
                "dkc_epochs": list(self.dkc_epochs), "dkc_seconds": list(self.dkc_seconds)}

    def load_extra_state(self, state: dict) -> None:
        self.dkc.idx, self.dkc.last_d, self.dkc.calls = state["idx"], state["last_d"], state["calls"]
        self.targets, self.phase, self.switch_epoch = state["targets"], state["phase"], state["switch_epoch"]
        self._build_exclusions()
        self.dkc_epochs, self.dkc_seconds = list(state["dkc_epochs"]), list(state["dkc_seconds"])
