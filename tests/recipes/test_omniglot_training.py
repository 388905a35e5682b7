"""A short real run: MAML on Omniglot 5-way 1-shot through MetaLearner and a Lightning Trainer.

The real Omniglot comes from ``omniglot_root`` (tests/conftest.py).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_maml import MAML
from lightning_maml.datamodules.omniglot import OmniglotDataModule
from lightning_maml.learner import MetaLearner
from lightning_maml.models import ConvNet


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_maml_learns_omniglot_5way_1shot(omniglot_root):
    torch.manual_seed(0)
    # Meta-batch 8 and 5 query shots per class keep a step at ~0.3 s on two CPU cores; the 100
    # test tasks (500 query images) are the same before and after training.
    dm = OmniglotDataModule(
        omniglot_root,
        ways=5,
        shots=1,
        query_shots=5,
        meta_batch_size=8,
        num_test_tasks=100,
        eval_meta_batch_size=50,
    )
    learner = MetaLearner(
        model=ConvNet(in_channels=1, ways=5, hidden=64, image_size=28),
        algorithm=MAML(inner_lr=0.4, inner_steps=1),
        loss="cross_entropy",
        eval_inner_steps=10,
    )
    before = trainer().test(learner, datamodule=dm, verbose=False)[0]["test/accuracy"]
    trainer(max_steps=150, limit_val_batches=0, num_sanity_val_steps=0).fit(learner, datamodule=dm)
    after = trainer().test(learner, datamodule=dm, verbose=False)[0]["test/accuracy"]
    # The baseline is the untrained net adapted for the same 10 steps, not chance (20%): it
    # scored 64% here, and 150 meta-steps 87% (after 100 steps: 80%). Each figure has a 95%
    # interval of about +/-2.5 points over these 500 query images, so a gain of 10 points is
    # far outside the noise yet leaves room for numerical differences across platforms.
    assert after > before + 0.10, f"test accuracy {before:.3f} before training, {after:.3f} after"
