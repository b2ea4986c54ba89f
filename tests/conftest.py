from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
ALL_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype) and v not in QUANTIZED},
    key=str,
)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern, NaNs included."""
    g = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-exact, type-exact comparison of two trees."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.requires_grad == b.requires_grad, where
        ac, bc = (x.detach().cpu().resolve_conj().resolve_neg().contiguous() for x in (a, b))
        assert torch.equal(ac.reshape(-1).view(torch.uint8), bc.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def train_state(seed: int = 0) -> dict[str, Any]:
    """A small real training state: model, AdamW after two steps, scheduler, RNG."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "epoch": 2,
    }


@pytest.fixture
def state() -> dict[str, Any]:
    return train_state()


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def reseal(manifest: dict[str, Any]) -> bytes:
    """An edited manifest's bytes under a fresh digest, so a reader's later checks, not that one, see the edit."""
    from torchkeep.manifest import MANIFEST_CHECKSUM, MANIFEST_DIGEST, encode_sorted, seal

    manifest = {k: v for k, v in manifest.items() if k not in (MANIFEST_DIGEST, MANIFEST_CHECKSUM)}
    return seal(encode_sorted(manifest))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto's server on 127.0.0.1), with the standard AWS environment pointing at it."""
    import os

    from tests.s3 import ACCESS, moto_endpoint

    saved = {k: os.environ.get(k) for k in (*ACCESS, "AWS_ENDPOINT_URL")}
    with moto_endpoint() as url:
        os.environ.update(ACCESS, AWS_ENDPOINT_URL=url)
        try:
            yield url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """``s3://BUCKET`` of a new, empty bucket."""
    from tests.s3 import new_bucket

    return f"s3://{new_bucket(s3_endpoint)}"
