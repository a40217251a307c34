"""Two-process DDP SFT on CPU, run by ``test_distributed.py`` as a script (Lightning starts rank 1 by re-running it).

``python distributed_sft.py ROOT DEMOS NAME [--stop-at STEP | --resume CKPT] [--fsdp]`` writes
``ROOT/NAME.rank<r>.json`` (each step's loss and batch token ids on that rank) and exports to ``ROOT/NAME-hf``.
``--stop-at`` saves ``ROOT/cut.ckpt`` at that step and stops; ``--fsdp`` shards with FullyShardedStrategy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning.pytorch import Callback, Trainer, seed_everything

from lit_rlhf.data.datamodules import DemonstrationDataModule
from lit_rlhf.phases.settings import OptimizerConfig
from lit_rlhf.phases.sft import SFTModule
from lit_rlhf.phases.shared import FullyShardedStrategy


class RecordSteps(Callback):
    def __init__(self, out: Path, stop_at: int | None) -> None:
        self.out, self.stop_at, self.steps = out, stop_at, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = {"loss": float(outputs["loss"]), "input_ids": batch["input_ids"].tolist()}
        if trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.out.parent / "cut.ckpt")
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("demonstrations")
    parser.add_argument("name")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    seed_everything(0)
    strategy = FullyShardedStrategy() if args.fsdp else "ddp"
    trainer = Trainer(
        max_steps=12, accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root,
        callbacks=[RecordSteps(args.root / args.name, args.stop_at)],
    )
    module = SFTModule(model_name_or_path="world", optimizer=OptimizerConfig(3e-3, warmup_steps=2),
                       export_dir=str(args.root / f"{args.name}-hf"))
    data = DemonstrationDataModule(path=args.demonstrations, batch_size=2, val_fraction=0.0)
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
