"""``hessian``, ``surface`` and ``sharpness`` on the user's own model and data (``--model``, ``--data``)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape import hessian, sharpness
from landscape.objective import Objective
from sam.cli import main

USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset


    class Points(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x, self.y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"features": self.x[i], "label": self.y[i]}


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(5, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, features):
            return self.head(torch.tanh(self.body(features)))


    def build():
        torch.manual_seed(0)
        return Net()


    def data(split="train"):
        points = Points(40 if split == "train" else 20, seed=0 if split == "train" else 1)
        return DataLoader(points, batch_size=16, collate_fn=lambda rows: (
            {"features": torch.stack([r["features"] for r in rows])}, torch.stack([r["label"] for r in rows])))


    def not_a_model():
        return 3
''')


@pytest.fixture()
def user(tmp_path, monkeypatch):
    (tmp_path / "usercode.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import usercode

    importlib.reload(usercode)
    return usercode


def test_the_hessian_of_a_users_model_and_loader_equals_the_python_api(user, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["hessian", "--model", "usercode:build", "--data", "usercode:data", "--out", str(out), "--k", "2",
            "--tol", "1e-6", "--dtype", "float64", "--trace-matvecs", "6", "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((out / "hessian.json").read_text())
    reference = hessian.top_eigenvalues(user.build(), F.cross_entropy, user.data("train"), k=2, tol=1e-6,
                                        dtype=torch.float64, progress=False)
    np.testing.assert_allclose(saved["eigen"]["eigenvalues"], reference.eigenvalues.numpy(), rtol=1e-6)
    assert saved["checkpoint"] == "usercode:build" and saved["n_examples"] == 40
    head = tmp_path / "head"
    assert main([*argv[:5], "--out", str(head), "--k", "1", "--dtype", "float64", "--no-trace", "--params", "head.*",
                 "--stream", "--no-progress"]) == 0
    only_head = hessian.top_eigenvalues(user.build(), F.cross_entropy, user.data("train"), k=1, dtype=torch.float64,
                                        params=["head.weight", "head.bias"], progress=False)
    assert json.loads((head / "hessian.json").read_text())["lambda_max"] == pytest.approx(
        float(only_head.eigenvalues[0]), rel=1e-3)


def test_surface_and_sharpness_of_a_users_model_on_its_test_split(user, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["surface", "--model", "usercode:build", "--data", "usercode:data", "--split", "test", "--out",
                 str(out), "--dim", "1", "--steps", "3", "--dtype", "float64", "--no-progress"]) == 0
    line = np.load(out / "surface_1d_test.npz")
    objective = Objective(user.build(), F.cross_entropy, user.data("test"), dtype=torch.float64)
    loss, accuracy = objective.loss_and_accuracy()
    assert line["loss"][1] == pytest.approx(loss, rel=1e-12) and line["accuracy"][1] == pytest.approx(accuracy)
    assert main(["sharpness", "--model", "usercode:build", "--data", "usercode:data", "--out", str(out), "--measures",
                 "m_sharpness", "--m", "1", "4", "--dtype", "float64", "--no-progress"]) == 0
    saved = json.loads((out / "sharpness.json").read_text())
    expected = sharpness.m_sharpness(user.build(), F.cross_entropy, user.data("train"), m=4, rho=0.05,
                                     dtype=torch.float64, progress=False)
    assert saved["measures"]["m_sharpness"]["value"][1] == pytest.approx(expected.value, rel=1e-10)


@pytest.mark.parametrize("argv, message", [
    (["--model", "usercode:build", "--out", "X"], "--model needs --data MODULE:CALLABLE"),
    (["--model", "usercode:build", "--data", "usercode:data"], "pass --out DIR"),
    (["--model", "usercode", "--data", "usercode:data", "--out", "X"], "--model takes MODULE:CALLABLE"),
    (["--model", "usercode:nothing", "--data", "usercode:data", "--out", "X"], "has no callable 'nothing'"),
    (["--model", "nowhere.models:build", "--data", "usercode:data", "--out", "X"], "cannot import nowhere.models"),
    (["--model", "usercode:not_a_model", "--data", "usercode:data", "--out", "X"], "returned int, not a torch.nn.Module"),
    (["--model", "usercode:build", "--data", "usercode:build", "--out", "X"], "returned data of no accepted form"),
    (["--data", "usercode:data"], "--data and --loss go with --model"),
    ([], "give a run directory"),
])
def test_bad_model_and_data_flags_are_one_line_errors(user, capsys, argv, message):
    assert main(["hessian", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
