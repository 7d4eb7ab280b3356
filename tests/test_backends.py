"""The evaluation-backend seam (issue 15): one registry, chosen by the dataset's kind or `backend=`."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from prunebench.backends import BACKENDS, backend_for
from prunebench.checks import CONFIG_DIR
from prunebench.errors import UserError


def cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(("dataset", "backend"), [("probe", "builtin"), ("shapes", "builtin"),
                                                  ("shapes_video", "builtin"), ("MME", "vlmeval"),
                                                  ("shapes_vlmeval", "vlmeval"), ("lmms_probe", "lmms_eval")])
def test_the_dataset_kind_picks_the_backend(dataset, backend):
    assert backend_for(cfg(f"dataset={dataset}")).name == backend
    assert backend_for(cfg(f"dataset={dataset}", f"backend={backend}")).name == backend


def test_a_backend_that_does_not_run_the_dataset_is_one_line():
    with pytest.raises(UserError, match=r"^backend=builtin does not run dataset 'MME' \(kind vlmeval\); "
                                        r"valid backends for it: vlmeval$"):
        backend_for(cfg("dataset=MME", "backend=builtin"))
    with pytest.raises(UserError, match=r"unknown backend .lmms.*valid choices: builtin, lmms_eval, vlmeval"):
        backend_for(cfg("backend=lmms"))


def test_batch_size_is_checked_against_the_backend():
    assert backend_for(cfg("batch_size=4")).name == "builtin"
    with pytest.raises(UserError, match=r"^batch_size=4: the VLMEvalKit backend asks the model one sample at a "
                                        r"time; use batch_size=1$"):
        backend_for(cfg("dataset=MME", "batch_size=4"))


def test_every_dataset_config_has_exactly_one_backend():
    for path in sorted((CONFIG_DIR / "dataset").glob("*.yaml")):
        kind = cfg(f"dataset={path.stem}").dataset.get("kind")
        assert sum(BACKENDS.get(n).kinds(str(kind)) for n in BACKENDS) == 1, path.stem


def test_lmms_eval_backend_without_lmms_eval_is_one_line(tmp_path):
    import importlib.util

    from prunebench import runner
    from prunebench.backends.lmms_eval import INSTALL_HINT

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed here (tests/test_lmms.py runs the backend)")
    assert backend_for(cfg("dataset=lmms_probe")).name == "lmms_eval"
    with pytest.raises(UserError) as err:
        runner.run(cfg("dataset=lmms_probe", f"results_dir={tmp_path}"), quiet=True)
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert not list(tmp_path.rglob("record.json"))  # refused before anything was written
