"""What autograd keeps for a backward, for the tests of what the layers keep less of."""
import torch


def saved_storages(fn, *args, **kwargs):
    """``(storages, out)``: the data pointers of the storages autograd keeps for the
    backward of ``out = fn(*args, **kwargs)``."""
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return kept, out


def storages(*tensors):
    """The data pointers of the storages of ``tensors``."""
    return {t.untyped_storage().data_ptr() for t in tensors}
