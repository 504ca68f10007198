"""A few SedRectifyTrainer steps under ``accelerate launch`` (tests/test_faults.py runs it with
``--config_file recipes/accelerate_configs/cpu.yaml --num_processes 2``). Each rank writes, under
OUT: its controller before and after training (``controller_{init,final}_rank<r>.safetensors``)
and its log history (``log_rank<r>.json``); the run checkpoints at its last step.

    python -m accelerate.commands.launch --config_file recipes/accelerate_configs/cpu.yaml \
        --num_processes 2 tests/rectify_two_ranks.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from ser_slm_fixtures import LABELS, TEXTS, make_dataset  # noqa: E402


def main(out: Path, steps: int = 3) -> None:
    from trustser.models.ser_slm import build_tiny_ser_slm
    from trustser.trainers.rectify import SedRectifyTrainer
    from trustser.trainers.rectify_config import SedRectifyConfig
    from trustser.utils import end_distributed

    torch.set_num_threads(1)
    model, proc = build_tiny_ser_slm(
        TEXTS,
        emotion_labels=LABELS,
        vocab_size=400,
        lm_hidden=32,
        encoder_dim=32,
        encoder_layers=1,
        lm_layers=1,
        max_audio_seconds=2,
        seed=0,
    )
    args = SedRectifyConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2,
        max_steps=steps,
        num_policies=3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=steps,
        learning_rate=1e-3,
        controller_learning_rate=1e-2,
        seed=0,
        controller_n_mels=16,
        controller_hidden_size=16,
        controller_embedding_size=4,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SedRectifyTrainer(model, args=args, train_dataset=make_dataset(16), processing_class=proc)
    rank = trainer.accelerator.process_index
    save_file(
        {k: v.detach().clone().contiguous() for k, v in trainer.controller.state_dict().items()},
        str(out / f"controller_init_rank{rank}.safetensors"),
    )
    trainer.train()
    save_file(
        {k: v.detach().clone().contiguous() for k, v in trainer.controller.state_dict().items()},
        str(out / f"controller_final_rank{rank}.safetensors"),
    )
    (out / f"log_rank{rank}.json").write_text(
        json.dumps({"num_processes": trainer.accelerator.num_processes, "log_history": trainer.state.log_history})
    )
    end_distributed()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out)
