"""Set up once for the whole suite: the Triton interpreter on a machine without a GPU, and the fixtures every area
uses. Plain helpers (paths, photos, other interpreters) are in utils/."""

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

import itertools

import pytest

_folder_ids = itertools.count()


@pytest.fixture
def tiny_folder(tmp_path):
    """Factory: save a tiny random Honeybee as a Hub folder with a unique basename (transformers 4.x caches
    remote code by folder basename) and return (folder, in-memory model, processor)."""
    from honeybee_hf.testing_utils import save_tiny_hub_folder

    def make(projector_type="c-abs", seed=0, **projector):
        folder = tmp_path / f"hb_{projector_type.replace('-', '')}_{seed}_{next(_folder_ids)}_{tmp_path.name[-12:]}"
        model, processor = save_tiny_hub_folder(folder, projector_type, seed=seed, **projector)
        return folder, model, processor

    return make
