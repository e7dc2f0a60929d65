"""Training options and persistence as scvi-tools users use them: validation and checkpoint
callbacks, Lightning's plateau scheduler, models saved with their AnnData, damaged model
files and cells of types a model does not know (each found by a user audit)."""

from __future__ import annotations

import json
import os

import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scbranch as sb
from scbranch.datasets import simulate_tree
from scbranch.model._training_plan import trainer_defaults

FIT = {"accelerator": "cpu", "enable_progress_bar": False}


def _model(n_per_class: int = 30):
    adata = simulate_tree(depth=2, n_per_class=n_per_class, dim=8, seed=0).to_anndata(
        labels_key="cell_type", obsm_key="X_latent"
    )
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    return sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)


@pytest.mark.parametrize("option", [{"check_val_every_n_epoch": 1}, {"enable_checkpointing": True}])
def test_validation_without_held_out_cells_is_refused_naming_train_size(option):
    # it failed inside Lightning ('An invalid dataloader was returned ... Found None')
    with pytest.raises(ValueError, match=r"holds none out: pass train_size < 1"):
        _model().train(max_epochs=1, **option, **FIT)


@pytest.mark.parametrize(
    "budget", [{"max_epochs": 0}, {"max_epochs": 2.5}, {"max_epochs": 1, "max_steps": 0}]
)
def test_a_budget_of_no_steps_is_refused(budget):
    # max_epochs=0 left the random weights marked as trained: generate() then sampled noise
    # without the untrained-model warning
    model = _model()
    with pytest.raises(ValueError, match=r"must be a whole number of at least 1"):
        model.train(**budget, **FIT)
    assert not model.is_trained


class _Scored(Callback):
    """The weights validation scores (the plan swaps the EMA in before this hook)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.module.state_dict().items()}


def test_checkpoints_hold_the_weights_their_validation_loss_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path)
    scored, checkpoint = _Scored(), scvi.train.SaveCheckpoint(monitor="validation_loss")
    model = _model()
    model.train(max_epochs=2, train_size=0.8, callbacks=[scored, checkpoint], **FIT)
    saved = sb.BranchedDiffusion.load(checkpoint.best_model_path).module.state_dict()
    # the EMA weights (what validation_loss scored and the model samples with), not the live
    assert all(torch.equal(saved[k], scored.weights[k]) for k in saved)
    # scvi-tools' reload of the best checkpoint reads a pickle scbranch never writes
    with pytest.raises(ValueError, match=r"load_best_on_end=True\) cannot reload"):
        _model().train(
            max_epochs=1, train_size=0.8, **FIT,
            callbacks=[scvi.train.SaveCheckpoint(monitor="validation_loss", load_best_on_end=True)],
        )  # fmt: skip


def test_reduce_lr_on_plateau_watches_the_validation_loss():
    # scvi-tools' plateau scheduler watched 'elbo_validation', which this plan never logs
    model = _model()
    model.train(
        max_epochs=2, train_size=0.8, check_val_every_n_epoch=1, **FIT,
        plan_kwargs={"reduce_lr_on_plateau": True},
    )  # fmt: skip
    assert len(model.history["validation_loss"]) == 2


def test_a_model_saved_with_its_anndata_loads_with_it(tmp_path):
    model = _model()
    model.train(max_epochs=1, **FIT)
    model.save(tmp_path / "m", save_anndata=True)
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")  # as scvi-tools: the saved cells
    assert loaded.adata is not None and loaded.adata.n_obs == model.adata.n_obs
    loaded.train(max_epochs=1, **FIT)  # it failed with "'NoneType' has no attribute 'is_view'"
    # saved again over it without them, the old cells do not stay behind
    model.save(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "adata.h5ad").exists()
    bare = sb.BranchedDiffusion.load(tmp_path / "m")
    with pytest.raises(ValueError, match="holds no AnnData to train on"):
        bare.train(max_epochs=1, **FIT)


@pytest.mark.parametrize(
    "damage",
    [
        lambda content: content["content"].pop("space"),
        lambda content: content["content"]["space"].update(state=None),
        lambda content: content["content"]["space"]["state"].clear(),
    ],
)
def test_a_damaged_space_record_is_reported_as_a_corrupt_model(tmp_path, damage):
    model = _model()
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    content = json.loads(path.read_text())
    damage(content)
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="corrupt"):
        sb.BranchedDiffusion.load(tmp_path / "m")


def test_loading_cells_of_an_unknown_type_names_it(tmp_path):
    model = _model()
    model.save(tmp_path / "m")
    adata = model.adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["CD34+"])
    adata.obs.iloc[:3, adata.obs.columns.get_loc("cell_type")] = "CD34+"
    with pytest.raises(ValueError, match=r"does not know: \['CD34\+'\].*add_classes"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata)


def test_ddp_history_goes_to_a_shared_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SCBRANCH_DDP_LOG_DIR", raising=False)
    cleanups = []
    monkeypatch.setattr(
        "scbranch.model._training_plan.atexit.register", lambda *a, **k: cleanups.append((a, k))
    )
    kwargs = {"strategy": "ddp_find_unused_parameters_true"}
    trainer_defaults(kwargs, None, 640, 64, train_size=1.0, validation_size=None)
    shared = kwargs["log_save_dir"]
    assert shared and not str(shared).startswith(str(tmp_path))
    again = {"strategy": "ddp_spawn"}  # every process (and a second call) reads the same one
    trainer_defaults(again, None, 640, 64, train_size=1.0, validation_size=None)
    assert again["log_save_dir"] == shared
    from lightning.pytorch.strategies import DDPStrategy

    strategy = {"strategy": DDPStrategy()}  # a strategy object, not its name
    trainer_defaults(strategy, None, 640, 64, train_size=1.0, validation_size=None)
    assert strategy["log_save_dir"] == shared
    single = {}
    trainer_defaults(single, None, 640, 64, train_size=1.0, validation_size=None)
    assert "log_save_dir" not in single  # one device: nothing is written
    # removed when the script ends, once (the directory was left behind in /tmp)
    assert len(cleanups) == 1 and cleanups[0][0][1] == shared
    (remove, path), options = cleanups[0]
    remove(path, **options)
    assert not os.path.exists(shared)


def test_ddp_logging_interval_counts_each_process_share_of_an_epoch(monkeypatch):
    # 120 cells in batches of 10: 12 steps an epoch, 6 per process on two devices; an interval
    # of 12 made Lightning warn that the epoch is shorter than its logging interval
    from lightning.pytorch.strategies import DDPStrategy

    from scbranch.model._streaming import ddp_processes, model_datamodule

    model = _model(n_per_class=30)  # 4 classes
    cases = [
        ("auto", "cpu", {}, 12),
        (2, "cpu", {}, 12),  # two devices without DDP: Lightning's default strategy decides
        (2, "cpu", {"strategy": "ddp"}, 6),
        ([0, 1, 2], "gpu", {"strategy": "ddp_spawn"}, 4),
        ("0,1", "gpu", {"strategy": DDPStrategy()}, 6),
        ("4", "gpu", {"strategy": "ddp"}, 3),
        (2, "gpu", {"strategy": "ddp", "num_nodes": 2}, 3),
        ("auto", "cpu", {"strategy": "ddp"}, 12),  # Lightning's CPU "auto" is one process
        (2, "cpu", {"strategy": "ddp", "log_every_n_steps": 5}, 5),  # the user's own
    ]
    for devices, accelerator, options, interval in cases:
        kwargs = dict(options)
        model_datamodule(
            model, devices, accelerator, batch_size=10, train_size=1.0, validation_size=None,
            class_balance=0.0, trainer_kwargs=kwargs,
        )  # fmt: skip
        assert kwargs["log_every_n_steps"] == interval, (devices, accelerator, options)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert ddp_processes("auto", "gpu", {"strategy": "ddp"}) == 4  # every visible GPU
    assert ddp_processes(-1, "auto", {"strategy": "ddp"}) == 4


def test_a_device_index_is_an_index_not_a_number_of_devices(monkeypatch):
    # load(dir, device=1) and `generate --device 1` gave cuda:0 (Lightning reads devices=1 as
    # "one device"), --device 2 cuda:0 too and --device 0 an error; emulated on two GPUs
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pytorch_cuda
    from scvi.model._utils import parse_device_args

    from scbranch.model._persistence import device_request

    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 2)
    for accelerator in (fabric_cuda.CUDAAccelerator, pytorch_cuda.CUDAAccelerator):
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: True))
        monkeypatch.setattr(accelerator, "auto_device_count", staticmethod(lambda: 2))
    _, _, as_given = parse_device_args(
        accelerator="gpu", devices=1, return_device="torch", validate_single_device=True
    )
    assert as_given == torch.device("cuda:0")  # Lightning's reading: the emulation holds
    for index in (0, 1):
        _, _, device = parse_device_args(
            accelerator="gpu",
            devices=device_request("gpu", index),
            return_device="torch",
            validate_single_device=True,
        )
        assert device == torch.device(f"cuda:{index}")
    assert device_request("cpu", 1) == "auto"  # CPUs have no index
    assert device_request("gpu", "auto") == "auto" and device_request("gpu", [1]) == [1]


def test_several_devices_in_every_form_lightning_takes():
    # "0,1", "2" or a DDPStrategy object fell back to scvi-tools' loader, whose class-balanced
    # batches have no distributed sampler: every process trained on the same batches
    from lightning.pytorch.strategies import DDPStrategy

    from scbranch.model._streaming import several_devices

    assert several_devices("0,1", "") and several_devices("2", "") and several_devices(-1, "")
    assert several_devices(1, DDPStrategy()) and several_devices([0, 1], "auto")
    assert not several_devices("1,", "") and not several_devices(1, "auto")
    assert not several_devices("auto", "") and not several_devices([3], "")
    with pytest.raises(ValueError, match="loader='scvi' cannot split batches"):
        _model().train(max_epochs=1, loader="scvi", devices="0,1", **FIT)
