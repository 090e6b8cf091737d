"""CIPA under torch.compile with the trainer's settings (nnUNet_compile=true on a GPU): static shapes, the scans run
eagerly between the compiled graphs, outputs and gradients equal to eager. Compiled with the ``aot_eager`` backend
(dynamo's graph capture and AOT autograd, no code generation), which keeps the tests fast on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.config as dynamo_config
from torch._dynamo import OptimizedModule

from nnunetv2_cipa.modules.ss2d import SS2D, cross_scan_positions
from nnunetv2_cipa.network import CIPA
from nnunetv2_cipa.ops import backends
from nnunetv2_cipa.ops import directional_scan as directional_scan_op
from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA, unwrap
from nnunetv2_cipa.training.compile_settings import RECOMPILE_LIMIT, use_static_shape_compile

from test_trainer import make_trainer, nnunet_paths  # noqa: F401 (fixture)


@pytest.fixture
def restored_dynamo_config():
    """torch's compile settings as they are now, restored after the test."""
    names = ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit")
    with dynamo_config.patch({name: getattr(dynamo_config, name) for name in names}):
        yield


@pytest.fixture
def compile_settings(restored_dynamo_config):
    """The trainer's settings for one test."""
    torch._dynamo.reset()
    yield use_static_shape_compile()
    torch._dynamo.reset()


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(y.abs().max() for y in b)
    return (max((x - y).abs().max() for x, y in zip(a, b)) / scale).item()


def test_settings_specialise_on_shapes(compile_settings):
    assert dynamo_config.automatic_dynamic_shapes is False
    assert dynamo_config.recompile_limit >= RECOMPILE_LIMIT
    assert "static shapes" in compile_settings


def test_scans_run_eagerly_between_compiled_graphs(compile_settings, monkeypatch):
    """The scan op is opaque to dynamo: its backend runs outside any trace, once per SS2D call, at every map size,
    and gets the cached position lists themselves (a GPU checks each list once, with a device sync)."""
    calls, positions_seen = [], []

    def recording_scan(*args):  # the in-place directional scan of a backend, here the torch one's gathered scan
        calls.append(torch.compiler.is_compiling())
        positions_seen.append(args[5])
        return directional_scan_op._gathered_scan(*args, "torch")

    monkeypatch.setitem(backends.BACKENDS, "reference", backends.ScanBackend(
        None, lambda device: None, backends.BACKENDS["torch"].selective_scan, recording_scan))
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    torch.manual_seed(0)
    layer = SS2D(d_model=8, d_state=4)
    compiled = torch.compile(layer, backend="aot_eager")
    for size in ((6, 6), (4, 10), (6, 6)):
        x = torch.randn(2, *size, 8)
        assert torch.allclose(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert calls == [False] * 6  # 3 compiled + 3 eager calls, none of them traced
    sizes = [size for size in ((6, 6), (4, 10), (6, 6)) for _ in range(2)]
    assert all(p is cross_scan_positions(*size) for p, size in zip(positions_seen, sizes))


@pytest.mark.slow
def test_compiled_network_matches_eager(compile_settings):
    """A training step with deep supervision, then a batch-1 prediction in eval mode, as nnU-Net runs them."""
    torch.manual_seed(0)
    network = CIPA(2, (32, 48), preset="micro", deep_supervision=True)
    compiled = torch.compile(network, backend="aot_eager")
    x = torch.rand(2, 2, 32, 48)

    def train_step(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        outputs = model(x)
        sum(o.square().mean() for o in outputs).backward()
        return [o.detach() for o in outputs], [p.grad.clone() for p in network.parameters() if p.grad is not None]

    (outputs, grads), (ref_outputs, ref_grads) = train_step(compiled), train_step(network)
    assert [o.shape for o in outputs] == [o.shape for o in ref_outputs] and len(grads) == len(ref_grads) > 0
    assert relative_difference(outputs, ref_outputs) < 1e-5
    assert relative_difference(grads, ref_grads) < 1e-5

    network.eval()
    network.deep_supervision = False
    with torch.no_grad():
        assert relative_difference([compiled(x[:1])], [network(x[:1])]) < 1e-5


def test_compiled_network_with_activation_checkpointing_matches_eager(compile_settings):
    """Checkpointed stages under torch.compile: the gradients of the plain eager step, and DCIM's BatchNorm running
    statistics updated once (the recomputation in backward leaves them alone)."""
    torch.manual_seed(0)
    network = CIPA(2, (32, 48), preset="micro", deep_supervision=True)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.rand(2, 2, 32, 48)

    def train_step(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        network.load_state_dict(initial)
        network.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in model(x)).backward()
        return ([p.grad.clone() for p in network.parameters() if p.grad is not None],
                [t.clone() for m in norms for t in (m.running_mean, m.running_var, m.num_batches_tracked)])

    ref_grads, ref_stats = train_step(network)
    network.activation_checkpointing = True
    grads, stats = train_step(torch.compile(network, backend="aot_eager"))
    assert norms and all(int(m.num_batches_tracked) == 1 for m in norms)
    assert relative_difference(grads, ref_grads) < 1e-5
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(stats, ref_stats))


def test_trainer_compiles_with_static_shapes(nnunet_paths, restored_dynamo_config, monkeypatch):  # noqa: F811
    trainer = make_trainer("nnUNetTrainerCIPA_debug", nnunet_paths)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)  # nnU-Net's decision on a GPU (never on CPU)
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule) and isinstance(unwrap(trainer.network), CIPA)
    assert dynamo_config.automatic_dynamic_shapes is False
    assert dynamo_config.recompile_limit >= RECOMPILE_LIMIT
    with open(trainer.log_file) as log:
        assert "torch.compile: static shapes" in log.read()


def test_network_built_for_nnunet_predictor_gets_static_shapes(nnunet_paths, restored_dynamo_config,  # noqa: F811
                                                                monkeypatch):
    """nnUNetv2_predict builds the network from the trainer class and compiles it itself (nnUNet_compile=true)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(nnunet_paths.plans())
    dynamo_config.automatic_dynamic_shapes = True
    monkeypatch.setenv("nnUNet_compile", "false")
    nnUNetTrainerCIPA.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)
    assert dynamo_config.automatic_dynamic_shapes is True
    monkeypatch.setenv("nnUNet_compile", "T")
    nnUNetTrainerCIPA.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)
    assert dynamo_config.automatic_dynamic_shapes is False and dynamo_config.recompile_limit >= RECOMPILE_LIMIT
