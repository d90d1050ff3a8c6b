"""What the kernel modules (lco_mini/infonce.py, lco_mini/pooling.py) share: Triton, the backend choice, dtypes.

  triton, tl           the triton package and triton.language, or None when triton is not installed
  BACKENDS             the backend= values every kernel function takes: "auto", "reference", "chunked", "triton"
  TRITON_DTYPES        the input dtypes the Triton kernels compile for (fp32, bf16, fp16)
  choose_path          backend="auto" -> "triton" on CUDA tensors, the PyTorch path elsewhere, said once
  require_triton       the error for backend="triton" where Triton cannot run
  accumulation_dtype   fp32 accumulation for 16- and 32-bit inputs (fp64 stays fp64)
  triton_interprets    is Triton's CPU interpreter on (TRITON_INTERPRET=1)?
  launcher             a @triton.jit kernel, made ready for the interpreter when that is what runs it

backend="auto" takes Triton for CUDA tensors and the PyTorch path on CPU, and says once which. On CPU,
backend="triton" runs the kernels in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is
first imported (slow; for tests).
"""
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton comes with torch's Linux wheels; elsewhere only the PyTorch paths exist
    triton = tl = None

BACKENDS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_announced = set()


def _announce(what, path, why):
    """Say once per process which path a function takes: no silent fallbacks. ("lco_mini.kernels" in the message
    names the kernel family, infonce and pooling, whose backend choice this is.)"""
    if (what, path) not in _announced:
        _announced.add((what, path))
        print(f"lco_mini.kernels: {what} uses the {path} path ({why})", file=sys.stderr)


def require_triton(device):
    """Raise a RuntimeError that says what to do when Triton kernels cannot run on `device` (a torch.device):
    triton not installed, CPU tensors without the interpreter, or a device that is neither CPU nor CUDA."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (Linux: pip install triton); "
                           "use backend='chunked' instead")
    if device.type == "cpu" and not triton_interprets():
        raise RuntimeError("backend='triton' got CPU tensors: Triton kernels run on CUDA GPUs, and on CPU only in "
                           "Triton's interpreter, which TRITON_INTERPRET=1 switches on when set before triton is "
                           "imported (e.g. in the shell). Use backend='chunked' on CPU.")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA (or CPU with TRITON_INTERPRET=1), not {device.type}")


def choose_path(what, backend, device, pytorch_path):
    """The path function `what` takes for `backend` on `device`: an explicit backend is checked and kept;
    "auto" becomes "triton" for CUDA tensors (when triton is installed), else `pytorch_path`, and the
    choice is printed once per process to stderr."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "triton":
        require_triton(device)
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton is not None:
        path, why = "triton", "CUDA tensors"
    elif device.type == "cuda":
        path, why = pytorch_path, "triton is not installed"
    else:
        path, why = pytorch_path, f"tensors on {device.type}"
    _announce(what, path, why)
    return path


def accumulation_dtype(dtype):
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def triton_interprets():
    """True when triton was imported with TRITON_INTERPRET=1: every @triton.jit function (ours and those of
    triton.language, such as tl.zeros) is then run by Triton's CPU interpreter. The switch is read when
    the functions are defined, so it must be in the environment before triton is first imported."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def launcher(kernel):
    """The kernel, made ready for the interpreter when that is what runs it: launch with launcher(kernel)[grid](...)."""
    if triton_interprets():
        _patch_interpreter_for_numpy_2_4()
    return kernel


def _patch_interpreter_for_numpy_2_4():
    """Triton 3.6's interpreter turns loop bounds into ints with int(one-element array), which NumPy >= 2.4
    refuses (triton-lang/triton#9171, fixed upstream). Read the element explicitly; interpreter only."""
    import triton.runtime.interpreter as interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "lco_mini_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.lco_mini_patched = True
    interpreter._patch_lang_tensor = patched
