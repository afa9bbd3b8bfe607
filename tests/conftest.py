"""Shared fixtures: NaN-poisoned outputs, the backends under test in this process, the skips of tests marked
``gpu``, and the tiny models and config the red_ppo tests train.

The suite runs twice (see the Makefile): once normally, for every backend but Triton, and
once with TRITON_INTERPRET=1 set before anything imports triton, for Triton alone.
"""

from __future__ import annotations

import os

import pytest
import torch

import red_kernels

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The red_ppo tests' models: a one-layer Llama small enough to train a few steps on CPU in seconds.
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
TINY_POLICY = dict(TINY_MODEL, tie_word_embeddings=True)  # as `synthetic.policy_config` for the demo and study


def tiny_config(*layers: dict, **sections: dict) -> dict:
    """A red_ppo config on the synthetic task with TINY_MODEL as policy and reward model, 8 rollouts in
    minibatches of 4; then each of ``layers`` and ``sections`` merged in, section by section, later ones winning."""
    data = {"model": {"tokenizer": "synthetic", "policy": {"config": dict(TINY_MODEL)},
                      "reward_model": {"config": dict(TINY_MODEL)}},
            "data": {"source": "synthetic"}, "rollout": {"batch_size": 8}, "ppo": {"minibatch_size": 4}}
    for layer in (*layers, sections):
        for section, values in layer.items():
            data.setdefault(section, {}).update(values)
    return data


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test marked ``gpu`` skips, before its fixtures are set up, where no CUDA GPU is visible, under the Triton
    interpreter, or where the backend it runs is not available on CUDA: its ``backend`` parameter, or else the
    marker's ``backend=`` (``@pytest.mark.gpu(backend="cuda")``)."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    if TRITON_INTERPRET:
        pytest.skip("GPU tests run in the normal process")
    callspec = getattr(item, "callspec", None)
    backend = callspec.params["backend"] if callspec is not None and "backend" in callspec.params else None
    backend = backend or marker.kwargs.get("backend")
    if backend is not None and backend not in red_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here: {red_kernels.available_backends('cuda')}")


def cpu_backends(varlen: bool = False) -> list[str]:
    """Backends this pytest process checks on CPU tensors (``varlen``: for redistribute_varlen)."""
    usable = red_kernels.available_backends("cpu", varlen=varlen)
    if TRITON_INTERPRET:
        return [name for name in usable if name == "triton"]
    return [name for name in usable if name != "triton"]


def fused_cpu_backends(varlen: bool = False) -> list[str]:
    return [name for name in cpu_backends(varlen) if name != "eager"]


def cpu_isas() -> list[str]:
    """The SIMD paths of the C++ CPU kernel this CPU can run (its best one and every narrower one); none
    without the kernel."""
    if "cpu" not in red_kernels.available_backends("cpu") or red_kernels._library._C is None:
        return []
    from red_kernels import _C

    names = ["scalar", "avx2", "avx512"]
    return names[: names.index(_C.cpu_isa()) + 1]


@pytest.fixture
def pinned_isa(request):
    """The C++ CPU kernel pinned to the instruction set ``request.param`` for one test (parametrise indirectly)."""
    from red_kernels import _C

    before = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)


@pytest.fixture
def poison_empty():
    """Every uninitialised tensor (torch.empty in Python, at::empty in C++) comes out NaN
    (integers: their max value), so an output element a kernel forgets to write fails."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
