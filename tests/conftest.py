"""Shared fixtures: the tiny random ViT, its random bank and a synthetic task of core.model.toy; nothing is
downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model():
    from core.model.toy import toy_model

    return toy_model()


@pytest.fixture(scope="session")
def task():
    from core.model.toy import toy_task

    return toy_task()


@pytest.fixture(scope="session")
def bank(model):
    from core.model.toy import toy_bank

    return toy_bank(model)
