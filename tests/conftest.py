import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports the
# kernels; without a GPU the interpreter is the only way to run them.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass
