"""
CAME-8bit: the CAME optimizer with block-wise 8-bit first moments (SANA-1.5, Sec. 2.3).

CAME (Luo et al., 2023) is Adafactor with a confidence term. For a weight matrix it keeps only row and
column statistics of the squared gradient (O(rows + cols) memory instead of O(rows * cols)), clips the
normalised update to RMS <= 1, keeps a first moment m of it, and divides m by the factored running average
of the instability (U - m)^2 before stepping. SANA-1.5 stores m in 8 bits, block by block (Eq. 1):

    q(x) = round((x - min(x)) / (max(x) - min(x)) * 255),   one (min, scale) pair per block of 2048 values

only for Linear and 1x1-conv weights with more than 16K elements; every other tensor and every second-moment
statistic stays fp32. State per quantized weight: ~1 byte per value plus 8 bytes per block, against 8 bytes
per value for AdamW-32 (`predicted_state_bytes`, `eq2_saved_bytes`).

Per step (g = gradient, b1, b2, b3 = betas, e1, e2 = eps; for a matrix, mean over columns gives rows):
    r = b2 r + (1-b2) mean_cols(g^2 + e1);   c = b2 c + (1-b2) mean_rows(g^2 + e1)
    U = g / sqrt(r c^T / mean(r));            U = U / max(1, RMS(U) / clip_threshold)
    m = b1 m + (1-b1) U                       (m is what gets quantized)
    R = b3 R + (1-b3) mean_cols((U - m)^2 + e2), same for the columns
    p = p - lr wd p - lr m / sqrt(R_r R_c^T / mean(R_r))
Non-matrix tensors keep a full second moment v (U = g / sqrt(v)) and step with m alone, as in the official code.

Speed, not in the paper: matrices of one shape (the same layer in every block) are updated as one (k, r, c)
stack, and the small tensors as one vector, so the per-operation overhead is paid per shape, not per tensor. A
matrix may join the stack of its transpose's shape: CAME's update is transpose-invariant (CAME8bit._orient).
step() sorts the parameters into stacks once and reuses that plan while the same parameters have gradients.
The state stays in that layout (each tensor's entries are views into one stack or vector per key), so a step
copies no state; its fp32 work space lives for one step only, and between steps the optimizer holds its state
and nothing else (`optimizer_held_bytes`). `factored_update` is the per-stack math, eager by default;
CAME8bit(compile=True) runs it through torch.compile instead. `python bench/came8bit_bench.py --threads=2` times
the laptop model's step against torch.optim.AdamW side by side (1.15-1.20x in five runs on a 2-core CPU; CAME-32
0.91-0.97x) and counts the bytes each optimizer holds.

Deviations from the official `CAME8BitWrapper` (NVlabs/Sana diffusion/utils/optimizer.py):
- A block is 2048 consecutive values of the flattened tensor, as Eq. 1 says; the official code splits the
  tensor into slabs of 2048 *rows*. The last block is padded with its own last value, so padding never widens
  its range.
- A block whose values are all equal (max = min, e.g. the all-zero start) gets its code step floored at 2^-64
  (STEP_FLOOR) and codes 0, so it dequantizes to its min exactly; the official code divides 0 by 0.
- Round to nearest is done as truncation of (x - min) / scale + 0.5 (ties go up).
- A matrix stepped as its transpose (CAME8bit._orient: when the transposed shape is the commoner one) keeps the
  transpose's state: the same update, but its 8-bit blocks tile the transpose's flattening.
- Which tensors are factored follows the official code: 2-D weights and 1x1 convs (as matrices out x in);
  3x3 and depthwise convs, biases and norms keep a full second moment (came_pytorch would factor the last two
  dims of a 3x3 kernel).
- e1 is added to the row and column means rather than to every g^2: the same number, one pass fewer.
- No `step` or `RMS` entries in the state: CAME has no bias correction, and the official code never reads them.
- Optional, off by default (the paper and the official code have none): `bias_correction=True` divides the
  instability R by (1 - b3^t), as Adam does for its moments. Without it, R starts near 0 and warms up over
  ~1/(1 - b3) = 10^4 steps, so early steps are up to 1/sqrt(1 - b3^t) larger than lr says: 10x at step 100,
  2.2x at step 2000. Short laptop runs at a laptop learning rate sit on a loss plateau for their first few
  hundred steps because of it (ABLATIONS.md, "CAME's start-up plateau"); long real-scale runs with 2000
  warm-up steps barely notice. A
  per-group step count (in param_groups, so it is saved and resumed) gives t.
- FSDP2 (`fully_shard`): each rank updates its own shard (`p.to_local()`, rows split along dim 0). Row
  statistics are local; the column sums, the mean of the row statistics and the clipping RMS are summed over
  the shards with `all_reduce`, so the fp32 math is the unsharded math. The 8-bit blocks tile each rank's
  flattened shard, so block boundaries (not the algorithm) depend on the world size, and the optimizer state
  is per rank: save it per rank and resume with the same world size.
"""

import collections
import functools
import itertools
import math
import operator
import warnings

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors  # one flat copy of many tensors (what DDP buckets use)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing can be a DTensor
    DTensor = ()

# the floor of a block's code step. m holds clipped, normalised updates (|U| ~ 1), so no real block has a step
# near 2^-64; a zero-range block (all zeros: the blocks behind a grown model's zero-init output projections get
# no gradient at first) still does arithmetic on it, and the floor keeps half a step times b1 a normal fp32
# number (tests/test_came8bit.py::test_zero_blocks_stay_normal_fp32); with the smallest normal fp32 as the floor
# they are denormals, which a CPU computes several times slower
STEP_FLOOR = 2.0**-64
# values per stack of same-shape matrices updated together (each of a step's two fp32 work buffers holds one).
# On a CPU 2**22 (16 MB buffers). On a GPU the step is many small element-wise kernels, and bigger stacks mean
# fewer of them: the 1.6B preset's step on an H200 took 129 ms at 2**22 and 93 ms at 2**26 (+0.6 GiB peak),
# interleaved in one run of bench/came8bit_bench.py --stacks (README "Speed on one GPU").
MAX_STACK = {"cpu": 2**22, "gpu": 2**26}

# -----------------------------------------------------------------------------
# the 8-bit quantizer (Eq. 1)


def quantize_blockwise(x, block_size, leading=0, overwrite=False, out=None):
    """Eq. 1 on each block of `block_size` consecutive values of x.flatten().
    Returns codes (n_blocks, block_size) uint8, mins (n_blocks, 1) fp32 and scales (n_blocks, 1) fp32 (one per
    row of codes), with value ~= code * scale + min, off by at most scale / 2 (round to nearest).
    leading=1: x is a stack of k tensors, each quantized on its own; the results gain a leading k dim.
    overwrite=True: x is scratch, and (if fp32 and contiguous) the codes are computed in its memory.
    out: (codes, mins, scales) tensors of those shapes to write the results into (and return)."""
    lead = x.shape[:leading]
    flat = x.detach().reshape(*lead, -1).float()  # (*lead, n)
    pad = -flat.shape[-1] % block_size
    if pad:  # repeat the last value: it lies inside the last block's range, so min and max do not move
        flat = torch.cat([flat, flat[..., -1:].expand(*lead, pad)], dim=-1)
    blocks = flat.view(*lead, -1, block_size)  # (*lead, n_blocks, block_size)
    codes, mins, scales = out or (None, None, None)
    mins = torch.amin(blocks, dim=-1, keepdim=True, out=mins)  # (*lead, n_blocks, 1); aminmax: ~15x slower on CPU
    # one code step; the floor guards zero-range blocks (x - min = 0 gives code 0, which dequantizes to min)
    scales = torch.sub(blocks.amax(dim=-1, keepdim=True), mins, out=scales).div_(255).clamp_min_(STEP_FLOOR)
    # (x - min) / scale + 0.5 lies in [0.5, 255.5]; truncating it rounds (x - min) / scale to the nearest code
    shifted = blocks.sub_ if overwrite else blocks.sub
    steps = shifted(mins.sub(scales, alpha=0.5)).mul_(scales.reciprocal())  # (*lead, n_blocks, block_size)
    steps = steps.to(torch.int16)  # via int16: float -> uint8 is ~3x slower on CPU
    return steps.to(torch.uint8) if codes is None else codes.copy_(steps), mins, scales


def dequantize_blockwise(codes, mins, scales, shape, out=None):
    """Inverse of quantize_blockwise: fp32 tensor of `shape` (the block size is codes.shape[-1]); codes with a
    leading stack dim (k, n_blocks, block_size) give (k, *shape). out: an fp32 tensor of codes' shape to work in."""
    lead = codes.shape[:-2]
    values = codes.float() if out is None else out.copy_(codes)  # (*lead, n_blocks, block_size)
    flat = values.mul_(scales).add_(mins).view(*lead, -1)  # (*lead, n_blocks * block_size)
    return flat[..., : math.prod(shape)].reshape(*lead, *shape)


# -----------------------------------------------------------------------------
# small functions


def is_matrix(p):
    """Linear weights and 1x1 convs: CAME factors their second moments (as the official code does)."""
    return p.dim() == 2 or (p.dim() == 4 and p.shape[2] == p.shape[3] == 1)


def is_quantized(p, min_8bit_size=16384):
    """Sec. 2.3: only Linear / 1x1-conv weights with more than 16K values keep an 8-bit first moment."""
    return is_matrix(p) and p.numel() > min_8bit_size


def _local(t):
    """This rank's shard of an FSDP2 DTensor; the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def _fp32(t):
    """This rank's shard of t in fp32: t itself when it already is (`.float()` costs a call even then)."""
    t = _local(t)
    return t if t.dtype == torch.float32 else t.float()


def _stepped_transposed(p, state):
    """Whether the state of the matrix p is that of its transpose (see CAME8bit._orient): its row statistics have
    one entry per column of p (a square matrix is never transposed)."""
    return state["exp_avg_sq_row"].shape[0] != _local(p).shape[0]


def _matrix_shape(shape, transposed):
    """(rows, cols) of the matrix that the update sees for a tensor of `shape` (a 1x1 conv (r, c, 1, 1) is r x c)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (cols, rows) if transposed else (rows, cols)


def _as_matrix(t, transposed):
    """t (shaped like a Linear weight or a 1x1 conv) as the matrix the update sees: a view, so stepping it steps t."""
    t = t[:, :, 0, 0] if t.dim() == 4 else t
    return t.mT if transposed else t


def _shard_groups(p):
    """Process groups across which p's rows are split (empty for plain tensors and DDP)."""
    if not isinstance(p, DTensor):
        return []
    groups = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise ValueError(f"CAME8bit needs parameters sharded along dim 0 (FSDP2's default), "
                                 f"got {placement} for a {tuple(p.shape)} parameter")
            groups.append(p.device_mesh.get_group(mesh_dim))
    return groups


def _sum_shards(x, groups):
    """A sum over this rank's shard -> the sum over the whole parameter (in place)."""
    for group in groups:
        dist.all_reduce(x, group=group)
    return x


def _mean_over_rows(x, dim, rows, groups, keepdim=False):
    """Mean over x's dim `dim`, which runs over the parameter's rows: under FSDP2 this rank's sum, summed over the
    shards, / the global `rows`; a plain mean otherwise."""
    return _sum_shards(x.sum(dim=dim, keepdim=keepdim), groups).div_(rows) if groups else x.mean(dim, keepdim)


def optimizer_state_bytes(optimizer):
    """Bytes held by the tensors in any torch optimizer's state (this rank's share under FSDP2)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value = _local(value)
                total += value.numel() * value.element_size()
    return total


def optimizer_held_bytes(optimizer):
    """Bytes of every tensor the optimizer object holds, not only its state: everything reachable from its
    attributes (state, param_groups, defaults, hooks, any buffer or closure it keeps), each storage counted once,
    the parameters themselves excluded (they and their gradients belong to the model). This rank's share under
    FSDP2. Between steps this is what the optimizer costs in memory."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    seen, storages = set(), {}

    def visit(obj):
        if id(obj) in seen or id(obj) in params or isinstance(obj, (type, str, bytes, int, float, bool)):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = _local(obj).untyped_storage()
            storages[storage._cdata] = storage.nbytes()  # views of one storage count once
        elif isinstance(obj, dict):
            for key, value in obj.items():
                visit(key)
                visit(value)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in obj:
                visit(value)
        elif callable(obj) and hasattr(obj, "__closure__"):  # a function: what its closure captured
            for cell in obj.__closure__ or ():
                visit(cell.cell_contents)
        elif hasattr(obj, "__dict__"):
            visit(vars(obj))

    visit(vars(optimizer))
    return sum(storages.values())


def predicted_state_bytes(params, optimizer="came8bit", block_size=2048, min_8bit_size=16384):
    """Exact optimizer-state bytes from shapes alone (meta-device parameters work: nothing is allocated).
    optimizer: "came8bit" | "came" (CAME8bit with quantize=False) | "adamw" (torch.optim.AdamW: two fp32
    moments + a 0-d fp32 step) | "adamw8bit" (bitsandbytes-style: two uint8 moments + two fp32 absmax per
    block of `block_size`, for tensors of >= 4096 values, bitsandbytes' own threshold; fp32 below it)."""
    if optimizer not in ("came8bit", "came", "adamw", "adamw8bit"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose came8bit, came, adamw or adamw8bit")
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw":
            total += 8 * n + 4
        elif optimizer == "adamw8bit":
            total += 2 * n + 8 * math.ceil(n / block_size) if n >= 4096 else 8 * n
        else:
            rows = p.shape[0] if p.dim() else 1
            second = 8 * (rows + n // rows) if is_matrix(p) else 4 * n  # r, c, R_r, R_c  or  v
            n_blocks = math.ceil(n / block_size)
            quantized = optimizer == "came8bit" and is_quantized(p, min_8bit_size)
            first = n_blocks * block_size + 8 * n_blocks if quantized else 4 * n  # codes + (min, scale)  or  m
            total += second + first
    return total


def eq2_saved_bytes(params, min_8bit_size=16384):
    """The paper's Eq. 2 estimate: sum over quantized layers of n_l * 24 bytes (an upper bound, Sec. 2.3)."""
    return 24 * sum(p.numel() for p in params if is_quantized(p, min_8bit_size))


# -----------------------------------------------------------------------------
# the optimizer


def _joined(states, key, cache, join):
    """The k states' `key` entries as one tensor, which this step updates in place for all k. After a join the
    entries are views into it (the state stays in that layout), and `cache` remembers the joined tensor and those
    views: while every entry still is its view, the step reuses the tensor (no copy, no layout checks). A new or
    replaced entry (first step, load_state_dict) is joined again: join(entries) -> (tensor, the entries' views)."""
    entries = [state[key] for state in states]
    hit = cache.get(key)
    if hit is not None and all(map(operator.is_, entries, hit[1])):
        return hit[0]
    joined, views = join(entries)
    for state, view in zip(states, views):
        state[key] = view
    cache[key] = joined, views
    return joined


def _stack_join(entries):
    """k same-shape tensors -> one (k, ...) tensor: a view of a single one, else a stacked copy."""
    if len(entries) == 1:
        return entries[0][None], entries
    stacked = torch.stack(entries)
    return stacked, stacked.unbind(0)


def _matrix_join(entries):
    """_stack_join for fp32 first moments m, each as the matrix it belongs to (a 1x1 conv's (r, c, 1, 1) m as r x c,
    so that it stacks with a transposed Linear's (r, c) m); the views given back have the entries' shapes."""
    joined, views = _stack_join([m.view(m.shape[0], -1) for m in entries])
    return joined, [view.view(m.shape) for view, m in zip(views, entries)]


def _concat_join(entries):
    """Tensors of any shapes -> one flat vector: a view of a single one, else a concatenated copy."""
    if len(entries) == 1:
        return entries[0].view(-1), entries
    flat = torch.cat([t.reshape(-1) for t in entries])
    return flat, [view.view(t.shape) for view, t in zip(flat.split([t.numel() for t in entries]), entries)]


def _work_space(n):
    """fp32 work space for one optimizer step: work(i, shape, device) is buffer i (0 or 1, n values each) viewed as
    `shape`, the two carved from one tensor allocated at the first call. step() makes a new one per call and drops
    it on return, so no work space survives a step: between steps the optimizer holds its state and nothing else
    (`optimizer_held_bytes`). Within a step every stack reuses the same memory: on a CPU a fresh large tensor
    costs its page faults each time (up to ~2x the price of one pass over it)."""
    flats = {}

    def work(i, shape, device):
        if device not in flats:
            flats[device] = torch.empty(2 * n, dtype=torch.float32, device=device)
        return flats[device][i * n: i * n + math.prod(shape)].view(shape)
    return work


def factored_update(grads, weights, st, lr, beta1, beta2, beta3, eps1, eps2, clip, rows, n, shards=(), work=None):
    """One step of k same-shape matrices (the equations at the top), in place: the readable definition, and what
    CAME8bit(compile=True) hands to torch.compile. grads: the k gradients (r, c) or (r, c, 1, 1) for 1x1 convs,
    only read; weights: the k fp32 tensors of that shape, stepped by lr (weight decay is already applied; a matrix
    stepped as its transpose comes as a transposed view, see _as_matrix); st: the stacked state, statistics (k, r)
    and (k, c) and m either as "exp_avg" (k, r, c) or in 8 bits ("exp_avg_codes" (k, n_blocks, block_size),
    "exp_avg_min", "exp_avg_scale"), all updated. rows, n: one matrix's global row count and size (under FSDP2 r is this rank's share; shards: the process groups that
    split the rows). work(i, shape): fp32 tensors to compute in (see _work_space); None: fresh ones. Each line is
    one operation over all k matrices, and every number is still each matrix's own (sums run over dims 1 and 2,
    never over k): on a CPU a small matrix costs more in per-operation overhead than in arithmetic."""
    k, shape = len(grads), grads[0].shape
    r, c = shape[0], math.prod(shape[1:])
    device = grads[0].device
    buffer = work or (lambda i, shape, device: torch.empty(shape, device=device))
    row, col, res_row, res_col = (st[f"exp_avg_{a}_{b}"] for a in ("sq", "res") for b in ("row", "col"))
    # g (k, r, c): a single gradient as it is, else the k stacked into buffer 0 (which then holds U, then
    # (U - m)^2, then the step); g^2 and then m in buffer 1
    g = grads[0].reshape(1, r, c).float() if k == 1 else torch.stack(grads, out=buffer(0, (k, *shape), device))
    g = g.view(k, r, c)
    sq = torch.mul(g, g, out=buffer(1, (k, r, c), device))  # (k, r, c) g^2
    row.lerp_(sq.mean(dim=2).add_(eps1), 1 - beta2)  # (k, r) columns are never split
    col.lerp_(_mean_over_rows(sq, 1, rows, shards).add_(eps1), 1 - beta2)  # (k, c)
    row_factor = row.div(_mean_over_rows(row, 1, rows, shards, keepdim=True)).rsqrt_()  # (k, r) 1/sqrt(r/mean)
    col_factor = col.rsqrt().unsqueeze(1)  # (k, 1, c)
    # update clipping: sum(U^2) = sum_ij row_factor_i^2 g_ij^2 col_factor_j^2, as (row vector x matrix) x column
    # vector (on a CPU the row vector first is much faster than the matrix x column vector first)
    sum_sq = torch.bmm(torch.bmm(row_factor.square().unsqueeze(1), sq), col_factor.square().mT)  # (k, 1, 1)
    clipping = _sum_shards(sum_sq, shards).div_(n * clip**2).sqrt_().clamp_min_(1.0)  # max(1, RMS(U) / clip)
    col_factor.div_(clipping)  # (k, 1, c): the clipping, folded into the column factor
    update = torch.mul(g, row_factor.unsqueeze(2), out=buffer(0, (k, r, c), device))  # U before its column factor
    # m = b1 m + (1 - b1) U (the official code's form): b1 m is the dequantized m with b1 folded into its scales and
    # mins (or the fp32 m times b1), and the column factor is applied inside addcmul_, so U is never formed
    quantized = "exp_avg" not in st
    if quantized:  # g^2 is spent: m is dequantized into its buffer
        codes, mins, scales = st["exp_avg_codes"], st["exp_avg_min"], st["exp_avg_scale"]
        exp_avg = dequantize_blockwise(codes, mins * beta1, scales * beta1, (r, c), out=buffer(1, codes.shape, device))
    else:
        exp_avg = st["exp_avg"].view(k, r, c).mul_(beta1)
    exp_avg.addcmul_(update, col_factor * (1 - beta1))  # (k, r, c) m
    res = torch.addcmul(exp_avg, update, col_factor, value=-1, out=update).square_()  # instability (U - m)^2
    res_row.lerp_(res.mean(dim=2).add_(eps2), 1 - beta3)  # (k, r)
    res_col.lerp_(_mean_over_rows(res, 1, rows, shards).add_(eps2), 1 - beta3)  # (k, c)
    res_row_factor = res_row.div(_mean_over_rows(res_row, 1, rows, shards, keepdim=True)).rsqrt_()  # (k, r)
    # p -= lr m / sqrt(R_r R_c^T / mean(R_r)): the row factor here, the column factor inside addcmul_
    step = torch.mul(exp_avg, res_row_factor.unsqueeze(2), out=res).view(k, *shape).unbind(0)
    res_col_factor = res_col.rsqrt().view(k, c, *shape[2:]).unbind(0)  # k (c,), or (c, 1, 1) for a 1x1 conv
    torch._foreach_addcmul_(weights, step, res_col_factor, value=-lr)
    if quantized:  # m back in 8 bits, each matrix its own blocks; this step used the fp32 m (official order)
        quantize_blockwise(exp_avg, codes.shape[-1], leading=1, overwrite=True, out=(codes, mins, scales))


@functools.cache
def _compiled_update():
    """factored_update through torch.compile, built once per process (kept here, not on an optimizer: compiled
    code is not optimizer state)."""
    return torch.compile(factored_update)


class CAME8bit(torch.optim.Optimizer):
    """CAME with block-wise 8-bit first moments (Sec. 2.3). quantize=False is plain 32-bit CAME.

    compile=True runs factored_update through torch.compile, which fuses its chain of element-wise passes into a
    few kernels, for unsharded parameters (FSDP2 shards stay eager: the column sums are all-reduced mid-update).
    It falls back to the eager update, with a warning, where compiling fails (no C++ compiler for inductor on a
    CPU, no triton on a GPU). Off by default: on a 2-core CPU the laptop model's first step compiled for 478 s
    (empty inductor cache) and later steps took 14x AdamW's time against eager's ~1.2x in the same run
    (`python bench/came8bit_bench.py --threads=2 --compile=True`). On a GPU it is unmeasured: the same command
    with --device=cuda times both."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
                 weight_decay=0.0, block_size=2048, min_8bit_size=16384, quantize=True, bias_correction=False,
                 compile=False):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 3 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be three numbers in [0, 1) (b1, b2, b3), got {betas}")
        if len(eps) != 2 or not all(e > 0 for e in eps):
            raise ValueError(f"eps must be two positive numbers (e1 for g^2, e2 for the instability), got {eps}")
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if block_size < 1 or min_8bit_size < 0:
            raise ValueError(f"block_size must be >= 1 and min_8bit_size >= 0, got {block_size}, {min_8bit_size}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold,
                        weight_decay=weight_decay, block_size=block_size, min_8bit_size=min_8bit_size,
                        quantize=quantize, bias_correction=bias_correction)
        super().__init__(params, defaults)
        self.compile = compile  # not a param_group entry: saved checkpoints stay loadable either way
        self._plans = {}  # group index -> (what it was made for, plan): see _plan

    def __setstate__(self, state):
        """Unpickling (torch.save of the optimizer object) and load_state_dict: torch keeps defaults, state and
        param_groups only, so the attributes set in __init__ are set again here (compile off)."""
        super().__setstate__(state)
        self.__dict__.setdefault("compile", False)
        self._plans = {}

    def _init_state(self, p, group, transposed=False):
        """Zero state for p; for a matrix stepped as its transpose (see _orient), the state of the transpose."""
        local = _local(p)
        fp32 = dict(dtype=torch.float32, device=local.device)
        state = self.state[p]
        if is_matrix(p):  # factored second moment and instability: rows split across FSDP2 ranks, columns not
            rows, cols = _matrix_shape(local.shape, transposed)
            state["exp_avg_sq_row"] = torch.zeros(rows, **fp32)
            state["exp_avg_sq_col"] = torch.zeros(cols, **fp32)
            state["exp_avg_res_row"] = torch.zeros(rows, **fp32)
            state["exp_avg_res_col"] = torch.zeros(cols, **fp32)
        else:
            state["exp_avg_sq"] = torch.zeros(local.shape, **fp32)
        if group["quantize"] and is_quantized(p, group["min_8bit_size"]):
            codes, mins, scales = quantize_blockwise(torch.zeros(local.shape, **fp32), group["block_size"])
            state.update(exp_avg_codes=codes, exp_avg_min=mins, exp_avg_scale=scales)
        else:
            state["exp_avg"] = torch.zeros(_matrix_shape(local.shape, True) if transposed else local.shape, **fp32)

    def _orient(self, group, matrices):
        """Whether each matrix is stepped as its transpose ({id: bool}), starting the state of those without one.
        CAME's update is transpose-invariant: mean(r) and mean(c) are both the mean of g^2, so V = r c^T / mean(r)
        transposes with G, and so does S. A matrix may therefore join the stack of the transposed shape, one stack
        (and its per-operation overhead) fewer: on the laptop model the (128, 256) and (128, 384) Linears join the
        (256, 128) and (384, 128) ones. A matrix starts transposed when more matrices have the transposed shape
        than its own, and stays so: its state is the transpose's (row statistics per column of p, 8-bit blocks
        tiling the transpose), which is how a restored state is read back. FSDP2 shards are never transposed
        (their rows are split)."""
        def stepped(p):  # (rows, cols) as p is stepped: its own shape, or its state's orientation if it has one
            return _matrix_shape(p.shape, bool(self.state[p]) and _stepped_transposed(p, self.state[p]))
        votes = collections.Counter(stepped(p) for p in matrices if not isinstance(p, DTensor))
        for p in matrices:
            if not self.state[p]:
                rows, cols = stepped(p)
                commoner = votes[cols, rows] > votes[rows, cols]  # the transposed shape
                self._init_state(p, group, transposed=commoner and not isinstance(p, DTensor))
        return {id(p): _stepped_transposed(p, self.state[p]) for p in matrices}

    def _plan(self, index, group, params):
        """Which tensors step() updates together: matrices of one shape (as stepped, see _orient) and 8-bit setting,
        stacked (up to MAX_STACK values at once), and all the rest as one vector, each kind by the process groups
        that shard it.
        Made once for a group's parameters (those with a gradient) and the stack limits, then reused, so a step
        does not sort its parameters again; each entry also keeps its joined state (see _joined)."""
        made_for = (tuple(map(id, params)), MAX_STACK["cpu"], MAX_STACK["gpu"])
        if index in self._plans and self._plans[index][0] == made_for:
            return self._plans[index][1]
        full, factored = {}, {}
        transposed = self._orient(group, [p for p in params if is_matrix(p)])
        for p in params:
            state = self.state[p]
            if not state:
                self._init_state(p, group)
            shards = tuple(_shard_groups(p))
            if not is_matrix(p):
                full.setdefault(shards, []).append(p)
                continue
            flip = transposed[id(p)]  # (shape of the matrix the update sees, of this rank's share, 8 bits or not)
            kind = (_matrix_shape(p.shape, flip), _matrix_shape(_local(p).shape, flip), "exp_avg" in state)
            stacks = factored.setdefault((shards, *kind), [[]])
            limit = MAX_STACK["cpu" if p.device.type == "cpu" else "gpu"]
            if (len(stacks[-1]) + 1) * p.numel() > limit and stacks[-1]:
                stacks.append([])
            stacks[-1].append(p)

        def entry(ps, shards):
            return dict(params=ps, shards=list(shards), cache={}, plain=not any(isinstance(p, DTensor) for p in ps),
                        transposed=[transposed.get(id(p), False) for p in ps])
        stacks = [entry(ps, shards) for (shards, *_), kind in factored.items() for ps in kind]
        for stack in stacks:  # one matrix's global row count, as the update sees it
            stack["rows"] = _matrix_shape(stack["params"][0].shape, stack["transposed"][0])[0]
        block = group["block_size"]
        work = max([len(s["params"]) * -(-_local(s["params"][0]).numel() // block) * block for s in stacks],
                   default=0)  # values in each of a step's two work buffers: the largest stack's (padded) size

        def size(p):  # (values here, values in the whole tensor)
            return _local(p).numel(), p.numel()
        fulls = [entry(sorted(ps, key=size), shards) for shards, ps in full.items()]
        for vector in fulls:  # sorted by size: each run of one size is clipped at once (_update_full)
            vector["runs"] = [(len(list(run)), *key) for key, run in itertools.groupby(vector["params"], size)]
        plan = dict(factored=stacks, full=fulls, work=work)
        self._plans[index] = made_for, plan
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            group["step"] = group.get("step", 0) + 1  # t, for the optional bias correction of R
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise ValueError("CAME8bit does not support sparse gradients; use dense gradients")
            plan = self._plan(index, group, params)
            work = _work_space(plan["work"])  # this step's work space, dropped on return
            for stack in plan["factored"]:
                self._update_factored(stack, group, work)
            for full in plan["full"]:
                self._update_full(full, group)
        return loss

    def _states(self, params, group, transposed):
        """The parameters' state dicts, looked up every step (the state may have been cleared or replaced since the
        plan was made; _joined then joins the new entries) and started where empty, in the plan's orientation."""
        states = [self.state[p] for p in params]
        if not all(states):
            for p, state, flip in zip(params, states, transposed):
                if not state:
                    self._init_state(p, group, flip)
        return states

    @staticmethod
    def _grads_and_weights(entry):
        """The entry's gradients and the fp32 tensors to step: the parameters themselves when they are plain fp32
        tensors, else this rank's shards or fp32 copies (which the caller writes back)."""
        params = entry["params"]
        if entry["plain"] and all([p.dtype == torch.float32 for p in params]):
            return [p.grad for p in params], params
        return [_local(p.grad) for p in params], [_fp32(p) for p in params]

    def _update_full(self, entry, group):
        """Biases, norms, 3x3 and depthwise kernels: U = g / sqrt(v), clipped, m, p -= lr m; no confidence term
        without factored statistics (official code). Many small tensors, so all at once: the gradients are
        concatenated into one vector and the state is one vector per key (each tensor's v and m are views into
        it), so each line is one operation for all of them, not one per tensor."""
        lr, wd, clip = group["lr"], group["weight_decay"], group["clip_threshold"]
        beta1, beta2, _ = group["betas"]
        eps1 = group["eps"][0]
        params, states = entry["params"], self._states(entry["params"], group, entry["transposed"])
        shards = entry["shards"]
        exp_avg_sq = _joined(states, "exp_avg_sq", entry["cache"], _concat_join)  # (N,) v of every tensor
        exp_avg = _joined(states, "exp_avg", entry["cache"], _concat_join)  # (N,) m
        grads, weights = self._grads_and_weights(entry)
        # (N,) fp32 island (Sec. 2.3), a copy: one for many tensors, but a single tensor comes back as a view of it
        grad = _flatten_dense_tensors(grads).to(torch.float32, copy=len(grads) == 1)
        if wd:
            torch._foreach_mul_(weights, 1 - lr * wd)
        exp_avg_sq.lerp_(grad.square().add_(eps1), 1 - beta2)  # v
        update = grad.div_(exp_avg_sq.sqrt())  # (N,) U
        start = 0
        for k, n, numel in entry["runs"]:  # k tensors of n values each (numel: global), one after another
            u = update[start: start + k * n].view(k, n)  # as one (k, n) matrix: the k norms in one operation
            start += k * n
            norm = torch.linalg.vector_norm(u, dim=1, keepdim=True)  # (k, 1)
            if shards:
                norm = _sum_shards(norm.square_(), shards).sqrt_()
            u.div_(norm.div_(math.sqrt(numel) * clip).clamp_min_(1.0))  # U / max(1, RMS(U) / clip), each its own
        exp_avg.lerp_(update, 1 - beta1)  # m
        torch._foreach_add_(weights, entry["cache"]["exp_avg"][1], alpha=-lr)
        if weights is not params:
            for p, weight in zip(params, weights):
                if weight is not _local(p):
                    _local(p).copy_(weight)

    def _update_factored(self, entry, group, work):
        """Linear weights and 1x1 convs of one shape (or of the transposed shape, see _orient), stacked into
        (k, r, c) tensors (factored_update). The state stays stacked: each matrix's entries are views into one
        (k, ...) tensor per key (see _joined), which the update changes in place."""
        flips, shards = entry["transposed"], entry["shards"]
        params, states = entry["params"], self._states(entry["params"], group, flips)
        st = {key: _joined(states, key, entry["cache"], _matrix_join if key == "exp_avg" else _stack_join)
              for key in states[0]}  # key: (k, ...)
        rows, n = entry["rows"], params[0].numel()  # global: means and the RMS span every shard
        grads, weights = self._grads_and_weights(entry)  # fp32 island: all optimizer statistics are fp32 (Sec. 2.3)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            torch._foreach_mul_(weights, 1 - lr * wd)  # decoupled weight decay (AdamW-style), as came_pytorch
        beta1, beta2, beta3 = group["betas"]
        # optional: R / (1 - b3^t) is the same as lr * sqrt(1 - b3^t) (the row factor is scale-free)
        lr_r = lr * math.sqrt(1 - beta3 ** group["step"]) if group["bias_correction"] else lr
        stepped = weights  # as the update sees them: with a transposed member, all as (r, c) matrices (views)
        if any(flips):
            grads, stepped = ([_as_matrix(t, f) for t, f in zip(ts, flips)] for ts in (grads, weights))
        args = (grads, stepped, st, lr_r, beta1, beta2, beta3, *group["eps"], group["clip_threshold"],
                rows, n)
        if self.compile and not shards:
            try:
                _compiled_update()(*args)  # its own work space, inside the fused kernels
            except torch._dynamo.exc.BackendCompilerFailed as e:  # raised before the compiled code runs
                warnings.warn(f"CAME8bit: torch.compile failed ({str(e).splitlines()[0]}); using the eager update")
                self.compile = False
        if not self.compile or shards:
            factored_update(*args, shards, work)
        if weights is not params:
            for p, weight in zip(params, weights):
                if weight is not _local(p):
                    _local(p).copy_(weight)

    def load_state_dict(self, state_dict):
        """torch casts every loaded state tensor to its parameter's dtype, which would turn uint8 codes into
        floats (and fp32 statistics into bf16 for bf16 params); put back the saved tensors as they were."""
        super().load_state_dict(state_dict)  # through __setstate__, which drops the plans: the loaded state may
        # differ in kind (8-bit or not) from what they were made for
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                self.state[p][key] = value.to(device=_local(p).device)


# -----------------------------------------------------------------------------
# demo: python came8bit.py


if __name__ == "__main__":
    torch.manual_seed(0)
    X = torch.randn(512, 256)
    Y = torch.sin(3 * X @ torch.randn(256, 128) / 16)  # (512, 128) a small regression problem
    print(f"{'optimizer':>10s} {'loss@0':>9s} {'loss@100':>9s} {'state bytes':>12s}")
    for name in ("came8bit", "came", "adamw"):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.SiLU(), torch.nn.Linear(256, 128))
        if name == "adamw":
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        else:
            opt = CAME8bit(net.parameters(), lr=1e-3, quantize=name == "came8bit")
        losses = []
        for step in range(101):
            loss = torch.nn.functional.mse_loss(net(X), Y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{name:>10s} {losses[0]:9.4f} {losses[-1]:9.4f} {optimizer_state_bytes(opt):12d}")
