"""``CaseResults``: per-case metrics gathered by torchmetrics, on one process and on two (gloo), against the inputs."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mqb.lit.case_results import Case, CaseResults

NAMES = ("dsc", "nsd", "hd95")


def case_values(seed: int, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {m: rng.random(classes) for m in NAMES}
    values["hd95"][seed % classes] = np.nan  # an absent class: NaN must survive the trip
    return values


# (case id, seed, spacing, prediction shape) per process: uneven shares, ids of different lengths (one non-ASCII),
# volumes of different shapes, and rank 1 repeating rank 0's first case as DistributedSampler padding does
SHARES = {
    0: [("case_b", 1, (1.0, 1.0, 2.5), (4, 5, 6)), ("a", 2, (0.8, 0.8, 3.0), (3, 3, 3))],
    1: [("fälle-long-identifier_07", 3, (1.5, 1.5, 1.5), (2, 7, 4)), ("case_b", 1, (1.0, 1.0, 2.5), (4, 5, 6))],
}


def prediction(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def fill(metric: CaseResults, rank: int) -> None:
    for case, seed, spacing, shape in SHARES[rank]:
        metric.update(case, case_values(seed), spacing, prediction(seed, shape))


def expected() -> dict[str, tuple]:
    out = {}
    for share in SHARES.values():
        for case, seed, spacing, shape in share:
            out.setdefault(case, (case_values(seed), spacing, prediction(seed, shape)))
    return out


def check(cases) -> None:
    want = expected()
    assert [c.case for c in cases] == sorted(want)
    for c in cases:
        values, spacing, pred = want[c.case]
        for m in NAMES:
            np.testing.assert_array_equal(c.metrics[m], values[m])  # bit for bit, NaN in place
        assert c.spacing == spacing
        assert c.prediction.dtype == torch.uint8 and torch.equal(c.prediction, pred)


def test_one_process_keeps_each_case_once_sorted_with_its_values():
    metric = CaseResults(NAMES, num_values=3, keep_predictions=True)
    fill(metric, 0)
    fill(metric, 1)
    check(metric.compute())


def test_without_predictions_and_bad_rows():
    metric = CaseResults(NAMES, num_values=3)
    metric.update("x", case_values(0), (1.0, 1.0, 1.0))
    assert metric.compute()[0].prediction is None
    with pytest.raises(ValueError, match="case 'y': no nsd"):
        metric.update("y", {"dsc": np.zeros(3), "hd95": np.zeros(3)}, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="case 'z': 4 metric values; expected 3 per metric"):
        metric.update("z", {m: np.zeros(2) if m == "dsc" else np.zeros(1) for m in NAMES}, (1.0, 1.0, 1.0))


def test_states_follow_the_module_device():
    metric = CaseResults(NAMES, num_values=3).to("meta")
    metric.update("x", case_values(0), (1.0, 1.0, 1.0))
    assert all(s.device.type == "meta" for s in metric.values)


def _worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = CaseResults(NAMES, num_values=3, keep_predictions=True)
        fill(metric, rank)
        cases = metric.compute()  # torchmetrics synchronises across the two processes here
        queue.put((rank, [(c.case, c.metrics, c.spacing, c.prediction.numpy()) for c in cases]))  # no shared memory
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_two_processes_gather_every_case_on_each():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank in (0, 1):
        check([Case(case, metrics, spacing, torch.from_numpy(pred)) for case, metrics, spacing, pred in got[rank]])
