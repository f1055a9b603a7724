"""The reference model: right shapes, accepted by Opacus, learns on one node's data."""

from __future__ import annotations

import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from flwr_guard.apps.digits.data import cached_partition_arrays, load_test_set, to_tensor_dataset
from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.training import evaluate, select_device, train_epochs


def test_forward_shape_and_dtype() -> None:
    logits = DigitsCNN()(torch.zeros(5, 1, 8, 8))
    assert logits.shape == (5, 10) and logits.dtype == torch.float32


def test_opacus_accepts_the_model_without_fixes() -> None:
    model = DigitsCNN()
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cuda_request_without_cuda_falls_back_to_cpu() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        assert select_device("cuda").type == "cpu"
    assert select_device("cpu").type == "cpu"


def test_local_training_learns() -> None:
    torch.manual_seed(0)
    images, labels = cached_partition_arrays(0, 2)
    test = load_test_set()
    model = DigitsCNN()
    trainloader = DataLoader(to_tensor_dataset(images, labels), batch_size=32, shuffle=True)
    testloader = DataLoader(to_tensor_dataset(test["image"], test["label"]), batch_size=512)
    _, before = evaluate(model, testloader, torch.device("cpu"))
    train_epochs(model, trainloader, 3, 0.05, 0.9, torch.device("cpu"))
    _, after = evaluate(model, testloader, torch.device("cpu"))
    assert before < 0.3 and after > 0.85
