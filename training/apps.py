from __future__ import annotations

from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """The machine side: generation, dataset builds, reward and DPO runs.

    The only app that imports torch, and only inside the functions that run
    on workers, so the web process stays light.
    """

    name = "training"
    verbose_name = "Training"
