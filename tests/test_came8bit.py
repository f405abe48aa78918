"""came8bit.py against independent references: a float64 CAME written from the equations, Eq. 1 in float64,
the 32-bit optimizer, a save/load round trip, and the unsharded run under FSDP2 and DDP (2 gloo processes)."""
import copy
import io
import os
import pickle
import tempfile

import pytest
import torch
import torch.nn as nn

from came8bit import (CAME8bit, dequantize_blockwise, eq2_saved_bytes, optimizer_held_bytes, optimizer_state_bytes,
                      predicted_state_bytes, quantize_blockwise)

BETAS, EPS = (0.9, 0.999, 0.9999), (1e-30, 1e-16)


# -----------------------------------------------------------------------------
# a float64 CAME, written from the equations (Luo et al. 2023, Alg. 1; SANA's wrapper for shapes and eps)


def reference_step(p, g, st, lr, wd=0.0, clip=1.0, betas=BETAS, eps=EPS, bias_correction=False):
    """One CAME step in float64 on full tensors: V = r c^T / mean(r) and S = R_r R_c^T / mean(R_r) formed
    explicitly (S / (1 - b3^t) with bias_correction). Returns the new parameter; st holds the statistics and the
    step count t (filled on the first call)."""
    b1, b2, b3 = betas
    e1, e2 = eps
    matrix = p.dim() == 2 or (p.dim() == 4 and p.shape[2:] == (1, 1))
    G = g.double().reshape(p.shape[0], -1) if matrix else g.double()
    if not st:
        st["t"], st["m"] = 0, torch.zeros_like(G)
        if matrix:
            st["r"], st["c"] = torch.zeros(G.shape[0]).double(), torch.zeros(G.shape[1]).double()
            st["Rr"], st["Rc"] = torch.zeros(G.shape[0]).double(), torch.zeros(G.shape[1]).double()
        else:
            st["v"] = torch.zeros_like(G)
    st["t"] += 1
    u = G**2 + e1
    if matrix:
        st["r"] = b2 * st["r"] + (1 - b2) * u.mean(dim=1)
        st["c"] = b2 * st["c"] + (1 - b2) * u.mean(dim=0)
        V = torch.outer(st["r"], st["c"]) / st["r"].mean()
    else:
        st["v"] = b2 * st["v"] + (1 - b2) * u
        V = st["v"]
    U = G / V.sqrt()
    U = U / max(1.0, U.pow(2).mean().sqrt().item() / clip)
    st["m"] = b1 * st["m"] + (1 - b1) * U
    if matrix:
        R = (U - st["m"]) ** 2 + e2
        st["Rr"] = b3 * st["Rr"] + (1 - b3) * R.mean(dim=1)
        st["Rc"] = b3 * st["Rc"] + (1 - b3) * R.mean(dim=0)
        S = torch.outer(st["Rr"], st["Rc"]) / st["Rr"].mean()
        if bias_correction:
            S = S / (1 - b3 ** st["t"])
        update = st["m"] / S.sqrt()
    else:
        update = st["m"]
    return p.double() * (1 - lr * wd) - lr * update.reshape(p.shape)


def structured_grad(shape, gen):
    """Gradients whose scale varies by row and column, so a wrong factorisation shows."""
    g = torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        g = g * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen).mul(3).exp()
        g = g * torch.rand(1, shape[1], *[1] * (len(shape) - 2), generator=gen).mul(3).exp()
    return g * 1e-2


@pytest.mark.parametrize("shape, wd, clip, bc", [
    ((24, 16), 0.0, 1.0, False),
    ((12, 8, 1, 1), 0.1, 1.0, False),  # 1x1 conv: factored as 12 x 8
    ((6, 1, 3, 3), 0.0, 1.0, False),  # depthwise 3x3: full second moment (official code)
    ((10,), 0.1, 1.0, False),
    ((24, 16), 0.0, 100.0, False),  # clipping never active
    ((24, 16), 0.1, 1.0, True),  # the optional bias correction of the instability
    ((10,), 0.0, 1.0, True),  # no instability term, nothing to correct
])
def test_32bit_matches_float64_reference(shape, wd, clip, bc):
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=gen))
    st = {}
    opt = CAME8bit([p], lr=1e-2, weight_decay=wd, clip_threshold=clip, quantize=False, bias_correction=bc)
    for step in range(6):
        g = structured_grad(shape, gen)
        if len(shape) == 2 and step < 3:
            g[3] = 0  # a row without gradient: eps1 keeps it finite
        before = p.detach().double().clone()
        p.grad = g
        opt.step()
        expected = reference_step(before, g, st, lr=1e-2, wd=wd, clip=clip, bias_correction=bc)
        # steps are ~1e-2; atol is rounding p itself to fp32 (half an ulp of |p| < 4)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=3e-7)
        m = opt.state[p]["exp_avg"].double().reshape(st["m"].shape)
        torch.testing.assert_close(m, st["m"], rtol=1e-4, atol=1e-7)  # m is O(1)
    assert torch.isfinite(p).all()


def test_matches_came_pytorch():
    came_pytorch = pytest.importorskip("came_pytorch")
    gen = torch.Generator().manual_seed(1)
    ours = [nn.Parameter(torch.randn(24, 16, generator=gen)), nn.Parameter(torch.randn(10, generator=gen))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    a = CAME8bit(ours, lr=1e-2, quantize=False)
    b = came_pytorch.CAME(theirs, lr=1e-2, betas=BETAS, eps=EPS)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = structured_grad(p.shape, gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# the quantizer (Eq. 1)


def test_quantizer_error_is_at_most_half_a_step_and_codes_follow_eq1():
    gen = torch.Generator().manual_seed(2)
    n, bs = 5000, 2048  # three blocks, the last one partial
    x = torch.randn(n, generator=gen) * torch.linspace(1e-4, 10, n) + torch.linspace(-3, 3, n)
    codes, mins, scales = quantize_blockwise(x, bs)
    assert codes.dtype == torch.uint8 and codes.shape == (3, bs) and mins.shape == scales.shape == (3, 1)
    y = dequantize_blockwise(codes, mins, scales, x.shape)
    step = scales.expand(3, bs).reshape(-1)[:n]
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().max()  # fp32 arithmetic on top of the rounding
    assert ((y - x).abs() <= step / 2 + slack).all()
    # Eq. 1 in float64, block by block, with the true min and max of each (partial) block
    for b in range(3):
        xb = x[b * bs:(b + 1) * bs].double()
        q = torch.round((xb - xb.min()) / (xb.max() - xb.min()) * 255)
        ours = codes[b, : len(xb)].double()
        assert (ours - q).abs().max() <= 1  # ties may round either way
        assert (ours == q).double().mean() > 0.999
        assert mins[b, 0] == xb.min().float() and ours.min() == 0 and ours.max() == 255


def test_quantizer_zero_range_blocks_and_padding():
    x = torch.cat([torch.zeros(64), torch.full((64,), 3.7), torch.linspace(5, 6, 40)])  # last block partial
    codes, mins, scales = quantize_blockwise(x, 64)
    y = dequantize_blockwise(codes, mins, scales, x.shape)
    assert torch.isfinite(y).all() and torch.isfinite(scales).all()
    assert (scales > 0).all()  # the guard: a positive code step, never 0 / 0 (official code)
    assert (codes[:2] == 0).all()
    assert torch.equal(y[:128], x[:128])  # constant blocks come back exactly
    assert mins[2, 0] == 5.0 and torch.isclose(mins[2, 0] + 255 * scales[2, 0], torch.tensor(6.0))  # padding kept out
    assert ((y[128:] - x[128:]).abs() <= scales[2, 0] / 2 + 1e-6).all()


def test_zero_blocks_stay_normal_fp32():
    """All-zero blocks (a grown model's new blocks get no gradient at first) must not drive the step into
    denormal fp32 numbers, which a CPU computes several times slower: the floored code step, halved (quantizer)
    or times b1 (the m update), stays a normal number. A real block's step is not floored."""
    normal = torch.finfo(torch.float32).tiny
    w = nn.Parameter(torch.zeros(64, 512))  # 32768 values: 8-bit m
    opt = CAME8bit([w], lr=1e-2)
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
    scales = opt.state[w]["exp_avg_scale"]
    assert (opt.state[w]["exp_avg_codes"] == 0).all() and (w == 0).all()
    assert (scales * BETAS[0] / 2 >= normal).all()
    x = torch.linspace(0, 1e-15, 2048)  # a tiny, but real, range
    assert torch.isclose(quantize_blockwise(x, 2048)[2][0, 0], torch.tensor(1e-15 / 255))


# -----------------------------------------------------------------------------
# the optimizer in 8 bits


def test_8bit_trajectory_stays_close_to_32bit():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(1024, 256, generator=gen)
    Y = X @ torch.randn(256, 128, generator=gen) / 20 + 0.1 * torch.randn(1024, 128, generator=gen)  # noisy
    w0 = torch.randn(128, 256, generator=gen) * 0.02  # 32768 values: quantized
    runs = {}
    for quantize in (True, False):
        w = nn.Parameter(w0.clone())
        opt = CAME8bit([w], lr=3e-3, quantize=quantize)
        losses = []
        for _ in range(120):
            loss = (X @ w.T - Y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert ("exp_avg_codes" in opt.state[w]) == quantize
        runs[quantize] = (w.detach(), torch.tensor(losses))
    (w8, l8), (w32, l32) = runs[True], runs[False]
    assert l32[-1] < 0.1 * l32[0]  # the problem is actually being solved (noise floor ~0.0075)
    assert ((l8 - l32).abs() / l32).max() < 0.02  # every step, not only the last
    assert (w8 - w32).norm() < 0.02 * (w32 - w0).norm()


def make_params(gen):
    return [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in
            [(130, 130), (128, 128), (16, 16), (20000,), (64, 64, 3, 3), (200, 100, 1, 1), (1,), ()]]


def test_only_large_matrices_are_quantized():
    gen = torch.Generator().manual_seed(4)
    params = make_params(gen)
    opt = CAME8bit(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    quantized = ["exp_avg_codes" in opt.state[p] for p in params]
    factored = ["exp_avg_sq_row" in opt.state[p] for p in params]
    # 130^2 > 16384 quantized; 128^2 = 16384 is not (strict >, as the official code); 1-D and 3x3 never
    assert quantized == [True, False, False, False, False, True, False, False]
    assert factored == [True, True, True, False, False, True, False, False]
    assert opt.state[params[0]]["exp_avg_codes"].dtype == torch.uint8


def test_state_dict_round_trip_gives_identical_steps():
    gen = torch.Generator().manual_seed(5)
    params = make_params(gen)
    opt = CAME8bit(params, lr=1e-3, weight_decay=0.01, bias_correction=True)  # its step count must survive too
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(5)]
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True, map_location="cpu")
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = CAME8bit(params2, lr=5.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(loaded)
    assert opt2.state[params2[0]]["exp_avg_codes"].dtype == torch.uint8
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["step"] == 3
    for gs in grads[3:]:
        for p, p2, g in zip(params, params2, gs):
            p.grad, p2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[p2][key]) and value.dtype == opt2.state[p2][key].dtype


def test_same_shape_matrices_stacked_equal_one_by_one(monkeypatch):
    """The optimizer updates same-shape matrices as one (k, r, c) stack: each must get exactly its own update, and
    the per-matrix state (views into the stack) must save and load like any other."""
    import came8bit

    gen = torch.Generator().manual_seed(6)
    shapes = [(130, 130)] * 3 + [(12, 8, 1, 1)] * 2 + [(24, 16)] * 4 + [(5,)]  # 130^2: 8-bit, a padded last block
    start = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [[structured_grad(s, gen) for s in shapes] for _ in range(4)]

    def run(max_stack, steps):
        monkeypatch.setattr(came8bit, "MAX_STACK", {"cpu": max_stack, "gpu": max_stack})
        params = [nn.Parameter(t.clone()) for t in start]
        opt = CAME8bit(params, lr=1e-2, weight_decay=0.01, bias_correction=True)
        for gs in grads[:steps]:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    alone, opt_alone = run(1, 4)  # every matrix on its own
    stacked, opt_stacked = run(2**22, 4)
    for a, b in zip(alone, stacked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for key, value in opt_alone.state[a].items():
            assert value.shape == opt_stacked.state[b][key].shape and value.dtype == opt_stacked.state[b][key].dtype
            if value.dtype != torch.uint8:  # codes may differ by one step where a value sits on a rounding edge
                torch.testing.assert_close(value, opt_stacked.state[b][key], rtol=1e-5, atol=1e-9)

    params, opt = run(2**22, 3)  # state of a stacked run through torch.save / torch.load, then the 4th step
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = CAME8bit(params2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for ps, o in ((params, opt), (params2, opt2)):
        for p, g in zip(ps, grads[3]):
            p.grad = g.clone()
        o.step()
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


def test_small_tensors_updated_as_one_vector_each_clip_on_their_own():
    """Biases, norms and 3x3 kernels are stepped as one vector, their clipping computed per run of one size: each
    tensor must still get exactly its own update, here with the clipping active (threshold 0.5)."""
    gen = torch.Generator().manual_seed(13)
    shapes = [(10,), (7,), (10,), (6, 1, 3, 3), (7,), (3,)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    refs = [{} for _ in shapes]
    opt = CAME8bit(params, lr=1e-2, clip_threshold=0.5)
    for _ in range(4):
        before = [p.detach().double().clone() for p in params]
        for i, p in enumerate(params):
            p.grad = structured_grad(p.shape, gen) * 10.0**i  # scales apart: a wrong pairing shows
        opt.step()
        for p, b, st in zip(params, before, refs):
            torch.testing.assert_close(p.detach().double(), reference_step(b, p.grad, st, lr=1e-2, clip=0.5),
                                       rtol=0, atol=3e-7)


def test_a_matrix_joins_the_stack_of_its_transpose_with_its_own_exact_update():
    """A wide matrix steps as its transpose when the transposed shape is the commoner one (one stack fewer): CAME
    is transpose-invariant, so each parameter must still match its own float64 reference, and its state is the
    transpose's."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(24, 16), (24, 16), (24, 16, 1, 1), (16, 24), (16, 24, 1, 1)]  # the last two: transposed
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    refs = [{} for _ in shapes]
    opt = CAME8bit(params, lr=1e-2, weight_decay=0.1, quantize=False)
    for _ in range(5):
        before = [p.detach().double().clone() for p in params]
        for p in params:
            p.grad = structured_grad(p.shape, gen)
        opt.step()
        for p, b, st in zip(params, before, refs):
            expected = reference_step(b, p.grad, st, lr=1e-2, wd=0.1)
            torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=3e-7)
    assert len(opt._plans[0][1]["factored"]) == 1  # one (5, 24, 16) stack
    for p, st in zip(params[3:], refs[3:]):  # the transpose's statistics and m
        torch.testing.assert_close(opt.state[p]["exp_avg_sq_row"].double(), st["c"], rtol=1e-5, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double().reshape(24, 16), st["m"].T, rtol=1e-4, atol=1e-7)


def test_bf16_matrices_in_a_transposed_stack_step_as_fp32_ones():
    """bf16 parameters step through fp32 copies that are written back: also when stepped as transposed views."""
    gen = torch.Generator().manual_seed(14)
    shapes = [(24, 16), (24, 16), (16, 24, 1, 1)]
    start = [torch.randn(s, generator=gen).bfloat16().float() for s in shapes]
    grads = [structured_grad(s, gen).bfloat16().float() for s in shapes]
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        params = [nn.Parameter(t.clone().to(dtype)) for t in start]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        CAME8bit(params, lr=1e-2, quantize=False).step()
        runs.append(params)
    for a, b in zip(*runs):
        assert b.dtype == torch.bfloat16 and torch.equal(a.detach().bfloat16(), b.detach())


def test_a_transposed_state_is_read_back_transposed():
    """The 8-bit blocks of a transposed matrix tile the transpose: a restored state must be stepped in that
    orientation even where the new plan alone would not transpose it (here only the wide matrix has a gradient)."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(64, 40), (64, 40), (40, 64)]
    grads = [[structured_grad(s, gen) for s in shapes] for _ in range(3)]
    kw = dict(lr=1e-2, block_size=64, min_8bit_size=0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = CAME8bit(params, **kw)
    for gs in grads[:2]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert opt.state[params[2]]["exp_avg_sq_row"].shape == (64,)  # stepped as (64, 40)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = CAME8bit(params2, **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps, o in ((params, opt), (params2, opt2)):
        for i, p in enumerate(ps):
            p.grad = grads[2][i].clone() if i == 2 else None
        o.step()
    assert torch.equal(params[2], params2[2])


def test_missing_gradients_and_a_reload_into_the_same_optimizer_leave_every_update_its_own():
    """step() reuses its grouping and the stacked state from step to step. A parameter without a gradient sits a
    step out, and a state loaded into the same optimizer replaces the old one: each matrix and vector must still
    get exactly the update of an optimizer of its own."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(130, 130)] * 3 + [(24, 16)] * 3 + [(7,)] * 3  # an 8-bit stack, a 32-bit stack, the vector
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    alone = [nn.Parameter(p.detach().clone()) for p in params]
    opt = CAME8bit(params, lr=1e-2)
    opts = [CAME8bit([p], lr=1e-2) for p in alone]
    skip = [set(), {1, 4, 7}, set(), {0, 3, 8}, set()]  # who has no gradient at each step
    for step, out in enumerate(skip):
        if step == 3:  # rewind everything to the state after step 1 (params too), then go on
            opt.load_state_dict(saved)
            for o, s in zip(opts, saved_alone):
                o.load_state_dict(s)
            for p, q, w in zip(params, alone, weights):
                p.data.copy_(w)
                q.data.copy_(w)
        for i, (p, q, shape) in enumerate(zip(params, alone, shapes)):
            g = None if i in out else structured_grad(shape, gen)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        for o in opts:
            o.step()
        if step == 1:
            saved = copy.deepcopy(opt.state_dict())
            saved_alone = [copy.deepcopy(o.state_dict()) for o in opts]
            weights = [p.detach().clone() for p in params]
    for p, q in zip(params, alone):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_pickled_optimizer_steps_on_as_the_original():
    """torch.save(optimizer) pickles only defaults, state and param_groups: the copy must still step, and step
    exactly as the original does."""
    gen = torch.Generator().manual_seed(14)
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in [(130, 130)] * 2 + [(7,)]]
    opt = CAME8bit(params, lr=1e-2)
    for p in params:
        p.grad = structured_grad(p.shape, gen)
    opt.step()
    copy_ = pickle.loads(pickle.dumps(opt))
    grads = [structured_grad(p.shape, gen) for p in params]
    for o in (opt, copy_):
        for p, g in zip(o.param_groups[0]["params"], grads):
            p.grad = g.clone()
        o.step()
    for p, q in zip(params, copy_.param_groups[0]["params"]):
        assert torch.equal(p, q)


def test_a_cleared_state_starts_again_from_zero():
    """After optimizer.state.clear() the next step is a first step again, as a fresh optimizer's, and the state
    it makes is what optimizer.state holds (nothing keeps updating the old one)."""
    gen = torch.Generator().manual_seed(13)
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in [(130, 130)] * 2 + [(24, 16), (7,)]]
    opt = CAME8bit(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = structured_grad(p.shape, gen)
        opt.step()
    opt.state.clear()
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    opt_fresh = CAME8bit(fresh, lr=1e-2)
    for p, q in zip(params, fresh):
        p.grad = structured_grad(p.shape, gen)
        q.grad = p.grad.clone()
    opt.step()
    opt_fresh.step()
    for p, q in zip(params, fresh):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt_fresh.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt_fresh.state[q][key])


def test_state_is_updated_in_place_after_the_first_step():
    """After its first step the state of a stack (and of the small tensors) is views into one tensor per key, which
    later steps update in place: no state tensor is copied or replaced."""
    gen = torch.Generator().manual_seed(11)
    params = make_params(gen) + [nn.Parameter(torch.randn(130, 130, generator=gen))]  # two 130x130: one stack
    opt = CAME8bit(params, lr=1e-3)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        where = {(id(p), key): (value.data_ptr(), value) for p in params for key, value in opt.state[p].items()}
        if step:
            assert all(where[key][0] == before[key][0] for key in where), "a state tensor was copied"
        before = where
    assert opt.state[params[0]]["exp_avg_codes"]._base is opt.state[params[-1]]["exp_avg_codes"]._base


def test_bf16_params_step_in_fp32_and_keep_fp32_state_through_load():
    p = nn.Parameter(torch.randn(200, 100).bfloat16())
    p32 = nn.Parameter(p.detach().float())
    opt, opt32 = CAME8bit([p], lr=1e-2), CAME8bit([p32], lr=1e-2)
    p.grad = torch.randn(200, 100).bfloat16()
    p32.grad = p.grad.float()
    opt.step()
    opt32.step()
    assert torch.equal(p, p32.detach().bfloat16())  # the same fp32 math, rounded once at the end
    opt2 = CAME8bit([nn.Parameter(p.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    state = next(iter(opt2.state.values()))
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_sq_row"].dtype == torch.float32


def test_weight_decay_is_decoupled():
    gen = torch.Generator().manual_seed(6)
    p0, g = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen)
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt_a, opt_b = CAME8bit([a], lr=0.01, weight_decay=0.1), CAME8bit([b], lr=0.01)
    a.grad, b.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a - b, -0.01 * 0.1 * p0, rtol=0, atol=5e-7)  # not in the statistics (atol: fp32 p)
    c = nn.Parameter(p0.clone())
    c.grad = torch.zeros_like(p0)
    CAME8bit([c], lr=0.01, weight_decay=0.1).step()
    torch.testing.assert_close(c.detach(), p0 * (1 - 0.01 * 0.1))  # zero gradient: only the decay moves p


# -----------------------------------------------------------------------------
# memory accounting


def test_predicted_bytes_match_measured_and_work_on_meta():
    gen = torch.Generator().manual_seed(7)
    params = make_params(gen)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opts = {"came8bit": CAME8bit(params), "came": CAME8bit(params, quantize=False),
            "adamw": torch.optim.AdamW(params)}
    meta = [torch.empty(p.shape, device="meta") for p in params]
    for name, opt in opts.items():
        opt.step()
        assert optimizer_state_bytes(opt) == predicted_state_bytes(params, name) == predicted_state_bytes(meta, name)
    quantized_values = 130 * 130 + 200 * 100
    assert eq2_saved_bytes(meta) == 24 * quantized_values
    n = sum(p.numel() for p in params)
    assert predicted_state_bytes(meta, "adamw8bit") < predicted_state_bytes(meta, "adamw") / 3
    assert predicted_state_bytes(meta, "came8bit") < predicted_state_bytes(meta, "came") < 8 * n


def test_held_bytes_between_steps_are_the_state_alone():
    """Everything reachable from the optimizer object (not only `state`) after a step: nothing beyond the state, for
    two Linear(1024, 1024) (there 1/7 of AdamW's or less) and for the laptop model."""
    from model import PRESETS, LinearDiT

    torch.manual_seed(0)
    nets = {"two Linear(1024, 1024)": nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)),
            "laptop": LinearDiT(PRESETS["shapes"])}
    for name, net in nets.items():
        params = list(net.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        ours, adamw = CAME8bit(params), torch.optim.AdamW(params)
        for _ in range(2):
            ours.step()
            adamw.step()
        held = optimizer_held_bytes(ours)
        assert held == optimizer_state_bytes(ours) == predicted_state_bytes(params), name
        assert optimizer_held_bytes(adamw) == predicted_state_bytes(params, "adamw"), name
        if name.startswith("two"):
            assert held <= optimizer_held_bytes(adamw) / 7, (held, optimizer_held_bytes(adamw))


def test_held_bytes_find_buffers_anywhere_and_count_views_once():
    p = nn.Parameter(torch.randn(200, 100))
    p.grad = torch.randn(200, 100)
    opt = CAME8bit([p])
    opt.step()
    state = optimizer_held_bytes(opt)
    assert state == optimizer_state_bytes(opt)  # the parameter and its gradient are not the optimizer's
    buf = torch.empty(1000)
    opt.cache = {"work": [buf, buf[:10]]}  # an attribute, a view of it
    assert optimizer_held_bytes(opt) == state + 4000
    opt.cache = None
    opt.hook = lambda: buf.sum()  # captured by a closure
    assert optimizer_held_bytes(opt) == state + 4000


def test_bad_arguments_raise_one_line_errors():
    p = [nn.Parameter(torch.zeros(3))]
    for kwargs in [dict(lr=-1), dict(betas=(0.9, 0.999)), dict(eps=(0.0, 1e-16)), dict(block_size=0),
                   dict(clip_threshold=0)]:
        with pytest.raises(ValueError):
            CAME8bit(p, **kwargs)
    with pytest.raises(ValueError, match="unknown optimizer"):
        predicted_state_bytes(p, "sgd")


# -----------------------------------------------------------------------------
# the compiled update


def compiler_works():
    try:
        torch.compile(lambda x: x * 2)(torch.ones(3))
        return True
    except Exception:  # no C++ compiler, or inductor unusable on this machine
        return False


def test_compiled_update_matches_eager():
    if not compiler_works():
        pytest.skip("torch.compile does not work on this machine")
    gen = torch.Generator().manual_seed(12)
    shapes = [(130, 130)] * 2 + [(24, 16)] * 2 + [(5,)]  # an 8-bit stack (padded last block), a 32-bit one, a vector
    start = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [[structured_grad(s, gen) for s in shapes] for _ in range(3)]
    runs = []
    for compile in (False, True):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = CAME8bit(params, lr=1e-2, weight_decay=0.01, compile=compile)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            runs.append([p.detach().clone() for p in params] + [{k: v.clone() for k, v in opt.state[p].items()}
                                                                 for p in params])
        assert opt.compile == compile  # compiled, no fallback
    eager, compiled = runs[:3], runs[3:]
    k = len(shapes)
    # the first step starts from the same state: fp32 rounding apart (steps are ~1e-2, |p| < 1)
    for a, b in zip(eager[0][:k], compiled[0][:k]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for step in range(3):  # the 32-bit matrices stay within rounding for every step
        for i in (2, 3):
            torch.testing.assert_close(eager[step][i], compiled[step][i], rtol=0, atol=1e-6)
            for key, value in eager[step][k + i].items():  # to rounding of each tensor's largest value
                torch.testing.assert_close(value, compiled[step][k + i][key], rtol=0, atol=1e-6 * value.abs().max())
    codes = [(run[k]["exp_avg_codes"].int() - run2[k]["exp_avg_codes"].int()).abs().max() for run, run2 in
             zip(eager, compiled)]
    assert max(codes) <= 1  # 8-bit codes: at most one step apart, where a value sits on a rounding edge


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch):
    import torch._inductor.config as inductor_config

    import came8bit

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    came8bit._compiled_update.cache_clear()
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(13)
    start, grad = torch.randn(9, 7, generator=gen), torch.randn(9, 7, generator=gen)
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    fused, eager = CAME8bit([a], compile=True), CAME8bit([b])
    a.grad, b.grad = grad.clone(), grad.clone()
    with pytest.warns(UserWarning, match="torch.compile failed"):
        fused.step()
    eager.step()
    assert not fused.compile and torch.equal(a, b)
    came8bit._compiled_update.cache_clear()
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# FSDP2 and DDP: two gloo processes


class Toy(nn.Module):
    """Uneven shards on 2 ranks: 33 and 7 rows; a matrix, a 1x1 conv, a depthwise 3x3 conv and 1-D params."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.w1 = nn.Parameter(torch.randn(33, 16, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(33, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 33, 1, 1, generator=g) * 0.2)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3, generator=g))
        self.s = nn.Parameter(torch.randn(7, generator=g))

    def forward(self, x):  # x (B, 16)
        h = torch.tanh(x @ self.w1.T + self.b1)  # (B, 33)
        z = h @ self.w2.view(8, 33).T * self.dw.sum(dim=(1, 2, 3))  # (B, 8)
        return z.square().mean() + (self.s * x[:, :7]).sum(dim=1).square().mean()


def _distributed_worker(rank, world_size, init_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(9))
    opt_kw = dict(lr=1e-2, block_size=32, min_8bit_size=64, weight_decay=0.01)  # w1: 528 values, quantized
    finals = {}
    for quantize in (False, True):
        ref, sharded = Toy(), Toy()
        fully_shard(sharded, mesh=mesh)
        opt_ref, opt = CAME8bit(ref.parameters(), quantize=quantize, **opt_kw), CAME8bit(
            sharded.parameters(), quantize=quantize, **opt_kw)
        for _ in range(4):  # same data on both ranks: the averaged sharded gradient is the unsharded one
            for model, o in ((ref, opt_ref), (sharded, opt)):
                o.zero_grad()
                model(x).backward()
                o.step()
        assert ("exp_avg_codes" in opt.state[sharded.w1]) == quantize
        assert opt.state[sharded.w1]["exp_avg_sq_row"].shape == (17 - rank,)  # this rank's rows only
        finals[quantize] = (torch.cat([p.detach().flatten() for p in ref.parameters()]),
                            torch.cat([p.full_tensor().flatten() for p in sharded.parameters()]))
    (ref32, sharded32), (ref8, sharded8) = finals[False], finals[True]
    # 32 bits: column sums, row means and the clipping RMS are all-reduced, so this is the unsharded math
    torch.testing.assert_close(sharded32, ref32, rtol=1e-5, atol=1e-6)
    # 8 bits: the blocks tile each shard, so boundaries differ; that may change no more than quantizing does
    quantization = (ref8 - ref32).norm()
    assert 0 < (sharded8 - ref8).norm() < 2 * quantization, ((sharded8 - ref8).norm(), quantization)
    # DDP: different data per rank, gradients averaged; every rank ends with the unsharded result
    xs = [torch.randn(16, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(world_size)]
    ref, ddp = Toy(), DistributedDataParallel(Toy())
    opt_ref, opt = CAME8bit(ref.parameters(), **opt_kw), CAME8bit(ddp.parameters(), **opt_kw)
    for _ in range(3):
        opt_ref.zero_grad()
        opt.zero_grad()
        (sum(ref(xi) for xi in xs) / world_size).backward()
        ddp(xs[rank]).backward()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref.parameters(), ddp.module.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
    # teardown: drop the gloo users, then wait for both ranks before destroying the group (without it a rank
    # could exit while gloo still ran: SIGABRT "terminate called without an active exception", twice in CI)
    del ddp, sharded, opt
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_and_ddp_match_unsharded():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch without gloo")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)

