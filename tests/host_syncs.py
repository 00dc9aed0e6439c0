"""python tests/host_syncs.py SCRIPT FLAGS...: runs a stage script as `python SCRIPT FLAGS` would
and prints `host syncs: N of M ops` last: how many of the M ops its training loop ran (from
vtp.start_log, which each stage calls right before its loop, to the end) make the host wait for
the device on CUDA: a tensor's .item(), float() or bool(), nonzero, a boolean-mask index, unique,
repeat_interleave without its output size. On the CPU nothing waits, but the ops are the same
ones, so this counts on a laptop what would idle a GPU. Not seen: .tolist(), .cpu() and .numpy(),
which on the CPU reach no op. Data workers are other processes, so what they compute on the host
is not counted (pass --num-workers 1 or more)."""
import runpy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vtp  # noqa: E402

aten = torch.ops.aten
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
count = ops = 0


class HostSyncs(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        global count, ops
        kwargs = kwargs or {}
        # x[mask] with a boolean mask: its size is the mask's count, which the host must read
        mask_index = func is aten.index.Tensor and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        # repeat_interleave's size is the repeats' sum, unless it is given
        unsized = func is aten.repeat_interleave.Tensor and kwargs.get('output_size') is None
        count += func in SYNCS or mask_index or unsized
        ops += 1
        return func(*args, **kwargs)


start_log = vtp.start_log


def start_log_and_count(*args, **kwargs):
    out = start_log(*args, **kwargs)
    HostSyncs().__enter__()  # stays on to the end of the run
    return out


vtp.start_log = start_log_and_count
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    print(f"host syncs: {count} of {ops} ops", flush=True)
