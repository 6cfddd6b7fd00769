"""bnlab.lab.train: the one training loop over its engines (more in test_stack, test_engine
and test_runner, which run it through experiments)."""

from __future__ import annotations

import pytest
import torch

from bnlab.lab.engine import StackedNets
from bnlab.lab.models import build_mlp
from bnlab.lab.stack import engine as stack_engine
from bnlab.lab.train import fit, sgd_, sgd_state


class FakeUnit:
    """A unit that keeps its rows in memory."""

    def __init__(self, key: str) -> None:
        self.key, self.rows, self.done, self.diverged = key, [], False, False

    def write(self, row: dict) -> None:
        assert not self.done, f"{self.key}: a row after its last"
        self.rows.append(row)

    def finish(self) -> None:
        self.write({"done": True})
        self.done = True

    def save(self, state: dict) -> None:
        pass

    def load(self) -> None:
        return None


@pytest.mark.parametrize("engine", ["stack", "stacked-nets"])
def test_a_network_that_fails_its_first_measurement_leaves_the_group(engine):
    torch.manual_seed(0)
    x, y = torch.randn(120, 8), torch.randint(0, 3, (120,))
    norm = "bn" if engine == "stack" else "gn"
    models = [build_mlp(8, 3, depth=2, width=16, activation="sigmoid", norm=norm,
                        init_scale=0.2, seed=s) for s in (0, 1)]
    units = [FakeUnit("a"), FakeUnit("b")]

    def measure(group, step, losses, nexts):
        return [{"v": float("nan") if step == 0 and m == 1 else 1.0} for m in range(len(losses))]

    fit(units, models, x, y,
        engine=stack_engine("sigmoid") if engine == "stack" else StackedNets,
        seeds=[0, 1], lrs=[0.1, 0.1], momentum=0.0, batch_size=30, steps=8, eval_every=4,
        measure=measure, at_start=True)
    assert [r.get("step") for r in units[0].rows] == [0, 4, 8, None]
    assert [sorted(r) for r in units[1].rows] == [["step", "v"], ["diverged", "step"], ["done"]]


def test_sgd_is_torch_optim_sgd_to_the_bit():
    torch.manual_seed(1)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    ours = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.07, momentum=0.9)
    buffers = [None, None]
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sgd_(ours, grads, buffers, 0.9, 0.07)
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, params))
    state = opt.state_dict()
    assert all(torch.equal(state["state"][k]["momentum_buffer"], buffers[k]) for k in (0, 1))
    assert sgd_state(0.07, 0.9, buffers)["param_groups"][0]["params"] == [0, 1]
