"""Phase 3 on unpaired feedback: KTO (Ethayarajh et al. 2024), each row a prompt with one completion labelled
desirable or undesirable, judged alone against a reference point, KL(π‖π_ref) estimated on the batch's mismatched
prompt–completion pairs. It reads ``UnpairedDataModule``, which also splits preference pairs into a desirable and an
undesirable row. It shares everything but the step with DPO (:class:`~lit_rlhf.phases.preference.PreferenceModule`).
"""

from __future__ import annotations

import torch

from lit_rlhf import losses
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import LoRAConfig
from lit_rlhf.phases.dpo_logprobs import concatenated, model_sequence_logprobs
from lit_rlhf.phases.preference import Metrics, PreferenceModule
from lit_rlhf.phases.settings import OptimizerConfig, check_settings

KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "lengths/chosen_minus_rejected")
"""Chosen and rejected are the desirable and undesirable rows; a batch reports those it has. No accuracies: the rows
are unpaired."""


class KTOModule(PreferenceModule):
    """KTO from an SFT export: ``desirable_weight`` and ``undesirable_weight`` weigh the two kinds of rows (raise the
    rarer kind's); the others are :class:`PreferenceModule`'s. Unlike DPO it cannot precompute the reference's
    log-probs: its KL pairs are formed per batch.

    Logs ``kl`` (the KL estimate on the mismatched pairs, gathered over devices, as TRL logs it; the reference
    point is its clamp at 0) and, for the rows a batch has, ``rewards/chosen``, ``rewards/rejected``,
    ``logps/chosen``, ``logps/rejected``; with both kinds ``rewards/margins`` and ``lengths/chosen_minus_rejected``.
    Rewards are β·(log π − log π_ref).
    """

    METRICS = KTO_METRICS

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        length_normalized: bool = False,
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=10),
        sampling: SamplingConfig = SamplingConfig(),
        eval_seed: int = 1234,
        max_prompt_length: int = 32,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        check_settings(non_negative={"desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight})
        super().__init__(model_name_or_path, beta, length_normalized, optimizer, sampling, eval_seed, max_prompt_length,
                         export_dir, trust_remote_code, dtype, lora)

    def _step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        hp = self.hparams
        matched, mismatched = concatenated(batch, ""), concatenated(batch, "kl_")
        logps = model_sequence_logprobs(self.model, matched, self._average_logps)[0]
        with torch.no_grad():
            mismatched_logps = model_sequence_logprobs(self.model, mismatched, self._average_logps)[0]
            local_kl = losses.kto_kl_estimate(mismatched_logps, self._reference_logps(mismatched))
        kl = self.all_gather(local_kl).mean()  # KTO's reference point, estimated on every device's batch together
        ref_logps = self._reference_logps(matched)
        desirable = batch["label"]
        per_row = losses.kto_loss(logps, ref_logps, desirable, kl, hp.beta, hp.desirable_weight, hp.undesirable_weight)
        rewards, lengths = hp.beta * (logps.detach() - ref_logps), matched["response_mask"].sum(1).float()
        metrics = {"kl": (kl, len(logps))}
        for side, rows in {"chosen": desirable, "rejected": ~desirable}.items():
            if rows.any():
                metrics[f"rewards/{side}"] = (rewards[rows].mean(), int(rows.sum()))
                metrics[f"logps/{side}"] = (logps.detach()[rows].mean(), int(rows.sum()))
        if desirable.any() and not desirable.all():
            metrics["rewards/margins"] = (rewards[desirable].mean() - rewards[~desirable].mean(), len(logps))
            length_gap = lengths[desirable].mean() - lengths[~desirable].mean()
            metrics["lengths/chosen_minus_rejected"] = (length_gap, len(logps))
        return per_row.mean(), metrics
