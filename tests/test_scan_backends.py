"""Backend choice on a GPU without a GPU: mamba-ssm stubbed in sys.modules, the CUDA device faked (a device object;
the probe's smoke call runs on the CPU), so the rules for ``auto``, the warning, the caches and the report are tested
in CI."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from nnunetv2_cipa.doctor import scan_backend_rows
from nnunetv2_cipa.ops import backends, cuda_scan
from nnunetv2_cipa.ops.backend_report import scan_backend_report
from nnunetv2_cipa.ops.backends import resolve_backend
from nnunetv2_cipa.ops.cuda_scan import FusedKernelProbe
from nnunetv2_cipa.ops.kernel_probe import smoke_call
from nnunetv2_cipa.ops.reference_scan import selective_scan_reference

GPU = torch.device("cuda", 0)
INTERFACE = "mamba_ssm.ops.selective_scan_interface"
UNDEFINED_SYMBOL = ("/site-packages/selective_scan_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                    "_ZN3c104cuda9SetDeviceEib")


class SmokeOnCpu:
    """The probe's smoke call, counted, run on the CPU in place of the faked GPU (or a fixed failure)."""

    def __init__(self, failure: str | None = None):
        self.devices, self.failure = [], failure

    def __call__(self, scan_fn, device):
        self.devices.append(device)
        return self.failure if self.failure is not None else smoke_call(scan_fn, torch.device("cpu"))


class TritonMissing(backends.TritonKernelProbe):
    """The triton backend's probe with triton not installed."""

    @staticmethod
    def import_kernels():
        raise ModuleNotFoundError("No module named 'triton'", name="triton")


class TritonBroken(backends.TritonKernelProbe):
    """The triton backend's probe with a triton that fails to initialise (nothing to install)."""

    @staticmethod
    def import_kernels():
        raise RuntimeError("Triton failed to load libcuda.so")


@pytest.fixture
def fresh_state(monkeypatch):
    """New probes (no cached import or smoke result), no warning printed yet, no scan-backend variable. The triton
    backend's probe: triton missing unless a smoke call is given for it."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_warned_devices", set())

    def install(smoke=None, triton_smoke=None):
        probe = FusedKernelProbe(smoke=smoke or SmokeOnCpu())
        monkeypatch.setattr(cuda_scan, "PROBE", probe)
        triton = TritonMissing() if triton_smoke is None else backends.TritonKernelProbe(smoke=triton_smoke)
        monkeypatch.setattr(backends, "TRITON_PROBE", triton)
        return probe

    return install


def stub_packages(monkeypatch) -> None:
    """Empty mamba_ssm and mamba_ssm.ops packages in sys.modules."""
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        package = types.ModuleType(name)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, name, package)


def stub_mamba(monkeypatch, extension="working", calls=None):
    """mamba_ssm, mamba_ssm.ops and the interface module in sys.modules; ``extension`` "working" (fwd and bwd),
    None (an install without the compiled extension) or "absent" (no attribute at all)."""
    interface = types.ModuleType(INTERFACE)

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        if calls is not None:
            calls.append({"dtypes": {t.dtype for t in (u, delta, A, B, C)},
                          "contiguous": all(t.is_contiguous() for t in (u, delta, B, C)),
                          "bias contiguous": delta_bias is None or delta_bias.is_contiguous(),
                          "D": D is not None, "z": z is not None, "softplus": delta_softplus})
        return selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus)

    interface.selective_scan_fn = selective_scan_fn
    if extension == "working":
        interface.selective_scan_cuda = types.SimpleNamespace(fwd=lambda *a: None, bwd=lambda *a: None)
    elif extension is None:
        interface.selective_scan_cuda = None
    stub_packages(monkeypatch)
    monkeypatch.setitem(sys.modules, INTERFACE, interface)


class FailingImport:
    """A meta-path finder that fails the interface's import with ``error``: by default as an extension built for
    another torch does."""

    def __init__(self, error: ImportError = ImportError(UNDEFINED_SYMBOL)):
        self.attempts, self.error = 0, error

    def find_spec(self, name, path=None, target=None):
        if name == INTERFACE:
            self.attempts += 1
            raise self.error
        return None


def fail_interface_import(monkeypatch, finder: FailingImport) -> None:
    """mamba_ssm and mamba_ssm.ops importable, the interface module failing through ``finder``."""
    stub_packages(monkeypatch)
    monkeypatch.delitem(sys.modules, INTERFACE, raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])


def test_working_extension_selects_cuda(fresh_state, monkeypatch, capsys):
    smoke = SmokeOnCpu()
    fresh_state(smoke)
    stub_mamba(monkeypatch)
    assert [resolve_backend(None, GPU) for _ in range(3)] == ["cuda"] * 3
    assert smoke.devices == [GPU]  # the smoke call ran once for the device and was cached
    assert resolve_backend("cuda", GPU) == "cuda"
    assert capsys.readouterr().err == ""
    report = scan_backend_report(GPU)
    assert (report["backend"], report["fused_kernel_problem"], report["fix"]) == ("cuda", None, None)


def test_probe_first_run_under_inference_mode_selects_cuda(fresh_state, monkeypatch, capsys):
    """nnUNetv2_predict makes the first scan inside torch.inference_mode(), where no autograd graph is recorded: the
    smoke call's backward must still run there, or every prediction would fall back to the torch scan."""
    fresh_state()
    stub_mamba(monkeypatch)
    with torch.inference_mode():
        assert resolve_backend(None, GPU) == "cuda"
        assert smoke_call(selective_scan_reference, torch.device("cpu")) is None
    assert capsys.readouterr().err == ""


def test_probe_first_run_inside_a_checkpointed_stage_selects_cuda(fresh_state, monkeypatch, capsys):
    """With activation checkpointing on, the first scan on a device may run inside torch.utils.checkpoint, whose
    saved-tensor hooks would capture the smoke call's own forward + backward: it must still pass (not cache the kernel
    as unusable) and leave the checkpointed stage's backward intact."""
    from torch.utils.checkpoint import checkpoint

    smoke = SmokeOnCpu()
    fresh_state(smoke)
    stub_mamba(monkeypatch)
    chosen = []

    def stage(x):
        chosen.append(resolve_backend(None, GPU))
        return (x * x).sum()

    x = torch.arange(3.0, requires_grad=True)
    checkpoint(stage, x, use_reentrant=False).backward()
    assert chosen == ["cuda", "cuda"]  # forward, and the recomputation in backward
    assert smoke.devices == [GPU]
    assert torch.equal(x.grad, 2 * x.detach())
    assert capsys.readouterr().err == ""


def test_cuda_backend_calls_the_fused_function_in_float32(fresh_state, monkeypatch):
    """The cuda row of the table hands mamba-ssm's function float32 contiguous inputs with D, z and the bias, and
    returns u's dtype (run here on CPU tensors through the stub, which computes the reference)."""
    fresh_state()
    calls = []
    stub_mamba(monkeypatch, calls=calls)
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(2, 8, 30, generator=gen, dtype=torch.float64).transpose(0, 1).contiguous()
                   .transpose(0, 1) for _ in range(3))  # non-contiguous float64
    A, B, C = -torch.rand(8, 4, generator=gen), torch.randn(2, 2, 4, 30, generator=gen), torch.randn(2, 2, 4, 30)
    D, bias = torch.randn(8, generator=gen), torch.rand(16, generator=gen)[::2]  # strided: mamba-ssm's C++ refuses it
    y = backends.BACKENDS["cuda"].selective_scan(u, delta, A, B, C, D, z, bias, True)
    assert calls == [{"dtypes": {torch.float32}, "contiguous": True, "bias contiguous": True, "D": True, "z": True,
                      "softplus": True}]
    expected = selective_scan_reference(u.float(), delta.float(), A, B, C, D, z.float(), bias, True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), expected)


@pytest.mark.parametrize("extension", [None, "absent"])
def test_missing_extension_falls_back_with_one_warning(fresh_state, monkeypatch, capsys, extension):
    """An install without the compiled extension imports fine: auto takes torch and says why, once."""
    smoke = SmokeOnCpu()
    fresh_state(smoke)
    stub_mamba(monkeypatch, extension=extension)
    assert [resolve_backend(None, GPU) for _ in range(3)] == ["torch"] * 3
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "cannot run on cuda:0" in err and "selective_scan_cuda" in err
    assert "order of magnitude or more slower" in err  # the expected slowdown
    assert "MAMBA_KEEP_CUDA_BUILD=TRUE" in err  # the fix
    assert smoke.devices == []  # nothing to smoke-test
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run on cuda:0: .*selective_scan_cuda.*fix: "):
        resolve_backend("cuda", GPU)


def test_import_error_falls_back_naming_it_and_is_not_retried(fresh_state, monkeypatch, capsys):
    fresh_state()
    finder = FailingImport()
    fail_interface_import(monkeypatch, finder)
    assert [resolve_backend(None, GPU) for _ in range(3)] == ["torch"] * 3
    assert resolve_backend(None, torch.device("cuda", 1)) == "torch"
    assert finder.attempts == 1  # the failed import is cached, for every device
    err = capsys.readouterr().err
    assert err.count("WARNING") == 2  # once per device
    assert "ImportError: " + UNDEFINED_SYMBOL in err
    with pytest.raises(ValueError, match="undefined symbol"):
        resolve_backend("cuda", GPU)


def test_import_failing_with_a_runtime_error_falls_back_naming_it(fresh_state, monkeypatch, capsys):
    """transformers' lazy imports raise RuntimeError (no ``name`` attribute) when one of its modules fails, e.g. after
    a torch / torchvision mismatch: the torch scan with a warning, not a crash of the backend choice."""
    fresh_state()
    error = RuntimeError("Failed to import transformers.generation.utils because of the following error")
    fail_interface_import(monkeypatch, FailingImport(error))
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert "cannot be imported (RuntimeError: Failed to import transformers.generation.utils" in err
    assert "pip install" in cuda_scan.PROBE.fix()


@pytest.mark.parametrize("missing, declared, requirement", [
    ("transformers", ["torch", "transformers", "triton>=3.5.0"], "transformers"),
    ("triton.language", ["torch", "transformers", "triton>=3.5.0"], "triton>=3.5.0"),
    ("huggingface_hub", ["torch", "transformers"], "huggingface_hub"),  # not declared: the module's name
    ("quack", ['quack-kernels>=0.3.4; extra == "dev"'], "quack"),
])
def test_missing_dependency_is_named_with_the_requirement_to_install(fresh_state, monkeypatch, capsys, missing,
                                                                     declared, requirement):
    """mamba-ssm installed with --no-deps: its package's imports fail on a dependency, which a rebuild would not
    bring; the warning and the fix name the requirement (from mamba-ssm's metadata where it is declared)."""
    fresh_state()
    top_level = missing.split(".")[0]
    fail_interface_import(monkeypatch, FailingImport(ModuleNotFoundError(f"No module named '{top_level}'",
                                                                         name=missing)))
    real_requires = cuda_scan.importlib.metadata.requires
    monkeypatch.setattr(cuda_scan.importlib.metadata, "requires",
                        lambda dist: declared if dist == "mamba-ssm" else real_requires(dist))
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert f"No module named '{top_level}'): it needs {requirement}" in err
    assert cuda_scan.PROBE.fix() == f'pip install "{requirement}"'
    assert f'pip install "{requirement}"' in err and "MAMBA_FORCE_BUILD" not in err  # the fix, no rebuild


def test_mamba_ssm_older_than_transformers_5_is_named_with_the_pin(fresh_state, monkeypatch, capsys):
    """mamba-ssm before 2.3.0 imports GreedySearchDecoderOnlyOutput, which transformers 5 removed: the fix is a
    transformers pin (or mamba-ssm >= 2.3.0), not a rebuild of the extension."""
    fresh_state()
    error = ImportError("cannot import name 'GreedySearchDecoderOnlyOutput' from 'transformers.generation'",
                        name="transformers.generation")
    fail_interface_import(monkeypatch, FailingImport(error))
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert "cannot import name 'GreedySearchDecoderOnlyOutput'" in err and "before 2.3.0 needs transformers<5" in err
    assert cuda_scan.PROBE.fix() == 'pip install "transformers<5"' and "MAMBA_FORCE_BUILD" not in err


def test_missing_submodule_of_mamba_ssm_is_not_a_dependency(fresh_state, monkeypatch):
    fresh_state()
    fail_interface_import(monkeypatch, FailingImport(ModuleNotFoundError("No module named 'selective_scan_cuda'",
                                                                         name="selective_scan_cuda")))
    assert "selective_scan_cuda" in cuda_scan.PROBE.problem(GPU)
    assert "pip install" in cuda_scan.PROBE.fix() and "--no-build-isolation" in cuda_scan.PROBE.fix()


def test_failed_smoke_call_falls_back_per_device(fresh_state, monkeypatch, capsys):
    failure = "its smoke call on cuda:0 failed (RuntimeError: CUDA error: no kernel image is available)"
    smoke = SmokeOnCpu(failure)
    fresh_state(smoke)
    stub_mamba(monkeypatch)
    assert resolve_backend(None, GPU) == resolve_backend(None, GPU) == "torch"
    assert resolve_backend(None, torch.device("cuda", 1)) == "torch"
    assert smoke.devices == [GPU, torch.device("cuda", 1)]  # once per device
    assert "no kernel image is available" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm is installed")
def test_mamba_ssm_not_installed(fresh_state, capsys):
    fresh_state()
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert "mamba-ssm is not installed" in err and 'pip install --no-build-isolation "nnunetv2-cipa[cuda]"' in err


@pytest.mark.parametrize("torch_version, cxx20", [("2.11.0+cu130", False), ("2.13.0", False), ("2.14.1+cu130", True),
                                                  ("3.0.0a0+git1234", True)])
def test_fix_tells_torch_2_14_users_to_build_with_cxx20(monkeypatch, torch_version, cxx20):
    """torch >= 2.14's headers need C++20, which mamba-ssm's setup.py (to 2.3.2.post1) overrides with -std=c++17."""
    monkeypatch.setattr(torch, "__version__", torch_version)
    fix = FusedKernelProbe().fix()
    assert fix.startswith(("MAMBA_KEEP_CUDA_BUILD=TRUE pip install", "MAMBA_FORCE_BUILD=TRUE"))
    assert ("-std=c++20 in place of -std=c++17" in fix) is cxx20
    assert (f"torch {torch_version} needs C++20" in fix) is cxx20


def test_smoke_call_checks_values_and_reports_errors():
    cpu = torch.device("cpu")
    assert smoke_call(selective_scan_reference, cpu) is None

    def raises(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel "
                           "errors might be asynchronously reported")

    assert smoke_call(raises, cpu) == ("its smoke call on cpu failed (RuntimeError: CUDA error: no kernel image is "
                                       "available for execution on the device)")
    doubled = smoke_call(lambda *a, **k: 2 * selective_scan_reference(*a, **k), cpu)
    assert doubled.startswith("its smoke call on cpu returned a wrong output")
    nan = smoke_call(lambda *a, **k: selective_scan_reference(*a, **k) * float("nan"), cpu)
    assert "wrong output" in nan


def test_report_prints_nothing_and_doctor_flags_the_unusable_kernel(fresh_state, monkeypatch, capsys):
    fresh_state()
    stub_mamba(monkeypatch, extension=None)
    report = scan_backend_report(GPU)
    assert capsys.readouterr().err == ""  # data only: the warning belongs to the scans
    assert set(report) == {"device", "requested", "backend", "torch", "cuda", "mamba_ssm", "triton", "gpu",
                           "fused_kernel_problem", "fix", "triton_problem", "triton_fix"}
    assert (report["device"], report["requested"], report["backend"]) == ("cuda:0", "auto", "torch")
    assert report["torch"] == torch.__version__ and "selective_scan_cuda" in report["fused_kernel_problem"]
    assert "No module named 'triton'" in report["triton_problem"]
    rows = scan_backend_rows(report, ["torch", "reference"])
    problems = [value for item, value, ok in rows if not ok]
    assert len(problems) == 2  # the fused kernel, and the Triton kernels that would have replaced it
    assert problems[0].startswith("CUDA present but fused kernel unusable: ") and report["fix"] in problems[0]
    assert problems[1].startswith("unusable too: triton cannot be imported")
    assert problems[1].endswith("Fix: pip install triton (PyTorch's Linux CUDA wheels include it)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels on CPU tensors, in the interpreter")
def test_unusable_fused_kernel_falls_back_to_the_triton_kernels(fresh_state, monkeypatch, capsys):
    """mamba-ssm without its extension, triton working (its smoke call runs the real kernels, on the CPU): auto takes
    triton, warns once naming the fused kernel's problem and its fix; doctor still flags the fused kernel."""
    pytest.importorskip("triton")
    triton_smoke = SmokeOnCpu()
    fresh_state(triton_smoke=triton_smoke)
    stub_mamba(monkeypatch, extension=None)
    assert [resolve_backend(None, GPU) for _ in range(3)] == ["triton"] * 3
    assert triton_smoke.devices == [GPU]  # the smoke call, once, found the kernels right
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "selective_scan_cuda" in err and "MAMBA_KEEP_CUDA_BUILD=TRUE" in err
    assert 'The "triton" scan kernels run instead' in err and "order of magnitude" not in err
    report = scan_backend_report(GPU)
    assert (report["backend"], report["triton_problem"]) == ("triton", None)
    rows = {item: (value, ok) for item, value, ok in scan_backend_rows(report, ["triton", "torch", "reference"])}
    assert rows["Triton scan kernels"][1] and rows["Triton scan kernels"][0].startswith("usable in its place")
    assert not rows["fused scan kernel"][1]


def test_working_fused_kernel_is_preferred_to_triton(fresh_state, monkeypatch, capsys):
    triton_smoke = SmokeOnCpu()
    fresh_state(triton_smoke=triton_smoke)
    stub_mamba(monkeypatch)
    assert resolve_backend(None, GPU) == "cuda"
    report = scan_backend_report(GPU)
    assert triton_smoke.devices == [] and capsys.readouterr().err == ""  # triton never probed: not needed
    assert (report["triton_problem"], report["triton_fix"]) == (None, None)
    assert "Triton scan kernels" not in {item for item, _, _ in scan_backend_rows(report, ["cuda", "torch"])}


def test_failing_triton_kernels_fall_back_to_torch_naming_both(fresh_state, monkeypatch, capsys):
    failure = "its smoke call on cuda:0 failed (CompilationError: at 12:4: unsupported)"
    fresh_state(triton_smoke=SmokeOnCpu(failure))
    stub_mamba(monkeypatch, extension=None)
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "selective_scan_cuda" in err
    assert "the 'triton' scan backend cannot run on cuda:0: the Triton " in err and "CompilationError" in err
    assert "order of magnitude or more slower" in err
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cuda:0: .*CompilationError"):
        resolve_backend("triton", GPU)  # a failing kernel: no install command to offer


def test_broken_triton_is_named_without_an_install_command(fresh_state, monkeypatch, capsys):
    fresh_state()
    monkeypatch.setattr(backends, "TRITON_PROBE", TritonBroken())
    stub_mamba(monkeypatch, extension=None)
    assert resolve_backend(None, GPU) == "torch"
    err = capsys.readouterr().err
    assert "triton cannot be imported (RuntimeError: Triton failed to load libcuda.so)" in err
    assert "pip install triton" not in err and scan_backend_report(GPU)["triton_fix"] is None


def test_triton_requested_without_triton_or_on_the_cpu(fresh_state, monkeypatch):
    fresh_state()
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cuda:0: triton cannot be imported .*"
                                         r"fix: pip install triton"):
        resolve_backend("triton", GPU)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_report_on_the_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    report = scan_backend_report("cpu")
    assert report["backend"] == resolve_backend(None, torch.device("cpu"))
    assert (report["gpu"], report["fused_kernel_problem"], report["fix"]) == (None, None, None)
    if importlib.util.find_spec("mamba_ssm") is None:
        assert report["mamba_ssm"] == "not installed"
    assert all(ok for _, _, ok in scan_backend_rows(report, backends.available_backends()))
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        scan_backend_report("cpu")


def test_triton_probe_checks_both_layouts():
    """The triton probe's smoke check runs the plain and the directional kernels (without CUDA on the interpreter's
    CPU tensors); a directional kernel that is wrong while the plain one is right is caught."""
    pytest.importorskip("triton")
    from nnunetv2_cipa.ops import triton_scan
    from nnunetv2_cipa.ops.reference_scan import directional_reference

    class WrongDirectional(backends.TritonKernelProbe):
        @staticmethod
        def import_kernels():
            return types.SimpleNamespace(triton_selective_scan=triton_scan.triton_selective_scan,
                                         triton_directional_scan=lambda *args: 2 * directional_reference(*args))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    working = backends.TritonKernelProbe()
    assert working.smoke_both_layouts(working.scan_fn(), device) is None
    wrong = WrongDirectional()
    assert wrong.smoke_both_layouts(wrong.scan_fn(), device).startswith(
        f"its directional smoke call on {device} returned a wrong output")
