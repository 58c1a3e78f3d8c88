"""The training hot path (layers.RotatedLinear, RotationGroup, kernels.chunks) equals the plain math.

Speed itself is measured by benchmarks/bench_training.py, never asserted here; these tests pin
what the fast path must keep: equal outputs and gradients, one saved input, per-step batching
that survives gradient accumulation, checkpointing, autocast and deepcopy.
"""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from boft_diffusion import butterfly, layers
from boft_diffusion.butterfly import cayley, chunk_matrices, factor_order, num_skew_params, rotate_rows, skew_from_packed
from boft_diffusion.kernels import chunks as chunk_ops
from boft_diffusion.kernels import cpu
from boft_diffusion.layers import BOFTLinear, ButterflyRotation, Cayley, RotatedLinear, link_rotations


def packed(m, d, b, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d // b, num_skew_params(b), generator=g, dtype=dtype) * 0.5


def test_cayley_function_equals_the_solve_and_its_gradient_is_exact():
    p = packed(3, 20, 4)
    skew, eye = skew_from_packed(p, 4), torch.eye(4, dtype=p.dtype)
    # Gauss-Jordan (Cayley's) and LU (the solve) round differently: equal to float64 rounding, not bitwise.
    torch.testing.assert_close(Cayley.apply(p, 4), torch.linalg.solve(eye + skew, eye - skew), atol=1e-14, rtol=0)
    assert torch.equal(Cayley.apply(p, 4), cayley(p, 4))
    assert torch.autograd.gradcheck(lambda p: Cayley.apply(p, 4), (p.requires_grad_(True),))


@pytest.mark.parametrize("d,b,m,active", [(64, 8, 4, None), (48, 4, 3, None), (24, 3, 1, None),
                                          (64, 8, 4, (True, False, True, True)), (64, 8, 4, (False, False, True, False))])
def test_chunk_build_equals_the_factored_chunks(d, b, m, active):
    blocks = cayley(packed(m, d, b), b)
    factors = tuple(sorted(factor_order(m, active, False)))
    built = chunk_ops.BuildChunks.apply(blocks, factors)
    torch.testing.assert_close(built, chunk_matrices(blocks, factor_order(m, active, False)), atol=1e-12, rtol=0)
    torch.testing.assert_close(built.mT, chunk_matrices(blocks, factor_order(m, active, True), True), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda q: chunk_ops.BuildChunks.apply(q, factors), (blocks.requires_grad_(True),))


@pytest.mark.parametrize("active", [None, (True, False, True, True)])
def test_cayley_and_chunk_build_in_many_small_passes_equal_one_pass(monkeypatch, active):
    """Both work through cache-sized passes (thousands of blocks in SD); here a pass is a chunk."""
    p = packed(4, 64, 8).requires_grad_(True)
    factors = tuple(sorted(factor_order(4, active, False)))
    g = torch.randn(1, 64, 64, dtype=p.dtype)  # dL/dchunks: d = c = 64

    def run():
        chunks = chunk_ops.BuildChunks.apply(Cayley.apply(p, 8), factors)
        return chunks.detach(), torch.autograd.grad(chunks, p, g)[0]

    whole = run()
    monkeypatch.setattr(butterfly, "CAYLEY_SLICE", 3 * 64)
    monkeypatch.setattr(chunk_ops, "LEVEL_SLICE", 1)
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=0)


def test_rotated_linear_gradients_are_exact():
    d, o, b = 32, 24, 4
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, d, generator=g, dtype=torch.float64), torch.randn(o, d, generator=g, dtype=torch.float64)
    bias, scale = torch.randn(o, generator=g, dtype=torch.float64), torch.randn(o, generator=g, dtype=torch.float64)
    chunks = chunk_ops.BuildChunks.apply(cayley(packed(3, d, b, 2), b), (0, 1, 2))
    blocks = cayley(packed(3, d, b, 3), b)
    stages = (("chunks",), ("blocks", (2, 1, 0)))
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, scale, chunks, blocks)]
    assert torch.autograd.gradcheck(lambda x, w, bias, s, c, q: RotatedLinear.apply(x, w, bias, s, stages, c, q), inputs)


def test_chunk_gradients_written_in_place_equal_a_plain_split_whatever_uses_the_pieces():
    """`chunks.split` lets each consumer's backward write into one buffer (no cat); a piece used
    twice, a piece never used, a piece rotated outside RotatedLinear, and a second backward through
    a retained graph must all still give split's gradients."""
    d, o, b = 32, 24, 4
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    weight, scale = torch.randn(o, d, generator=g, dtype=torch.float64), torch.ones(o, dtype=torch.float64)
    blocks = cayley(packed(3, 4 * d, b, 5), b).requires_grad_(True)

    def loss(pieces):
        uses = ((x, pieces[0]), (x.flip(0) * 3, pieces[0]), (x, pieces[1]))  # piece 0 twice, with other inputs
        y = [RotatedLinear.apply(rows, weight, None, scale, (("chunks",),), piece) for rows, piece in uses]
        return sum((t * t).sum() for t in y) + chunk_ops.ChunkRotate.apply(x, pieces[3], False).sum()

    def grads(split):
        chunks = chunk_ops.BuildChunks.apply(blocks, (0, 1, 2))  # (4 d / 16, 16, 16)
        total = loss(split(chunks, [2, 2, 2, 2]))
        first = torch.autograd.grad(total, blocks, retain_graph=True)[0]
        return first, torch.autograd.grad(total, blocks)[0]

    in_place = grads(chunk_ops.split)
    plain = grads(lambda chunks, sizes: chunks.split(sizes))
    for got, want in zip(in_place, plain):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert in_place[0].abs().sum() > 0


@pytest.mark.parametrize("input_grad", [True, False])  # False: text k/v, whose input needs no gradient
@pytest.mark.parametrize("tokens", [2, 300])  # few tokens: factored blocks or x rotated; many: chunks or W rotated
@pytest.mark.parametrize("b", [4, 8])  # 8: the C++ rows kernel where it runs (fp32); 4: the PyTorch paths
def test_boft_linear_equals_the_dense_math_for_composed_and_fractional_adapters(tokens, input_grad, b):
    d, o = 32, 24
    linear = nn.Linear(d, o).requires_grad_(False)
    rotations = [ButterflyRotation(d, o, b, 3, init="random"), ButterflyRotation(d, o, b, 2, init="random")]
    rotations[0].set_active((1.0, 0.5, 1.0))
    x = torch.randn(tokens, d, requires_grad=input_grad)
    y = layers.boft_linear(x, linear, rotations)
    z = x
    for r in rotations:
        z = rotate_rows(z, cayley(r.scaled_skew(), b), r.active)
    expected = (z @ linear.weight.T) * rotations[0].boft_s * rotations[1].boft_s + linear.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    params = [x] * input_grad + [p for r in rotations for p in r.parameters()]
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(expected, params, dy)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_float64_gradients_stay_float64():
    """The token sums for dL/ds and dL/dbias widen fp16/bf16 to fp32 but never narrow fp64."""
    d, o, b = 32, 24, 4
    linear = nn.Linear(d, o).double()
    rotation = ButterflyRotation(d, o, b, 3, init="random").double()
    x = torch.randn(300, d, dtype=torch.float64, requires_grad=True)
    y = layers.boft_linear(x, linear, [rotation])
    expected = rotate_rows(x, cayley(rotation.boft_skew, b)) @ linear.weight.T * rotation.boft_s + linear.bias
    params = [x, linear.weight, linear.bias, *rotation.parameters()]
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(expected, params, dy)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("tokens", [2, 300])
@pytest.mark.parametrize("b", [4, 8])
def test_only_the_scale_trained_on_an_input_without_gradient(tokens, b):
    """Frozen rotations, trained s, an input that needs no gradient (text k/v): nothing to rotate
    back, and dL/ds still equals the dense math."""
    d, o = 32, 24
    linear = nn.Linear(d, o).requires_grad_(False)
    rotations = [ButterflyRotation(d, o, b, 3, init="random"), ButterflyRotation(d, o, b, 2, init="random")]
    for r in rotations:
        r.boft_skew.requires_grad_(False)
    x = torch.randn(tokens, d)
    y = layers.boft_linear(x, linear, rotations)
    z = x
    for r in rotations:
        z = rotate_rows(z, cayley(r.scaled_skew(), b), r.active)
    expected = (z @ linear.weight.T) * rotations[0].boft_s * rotations[1].boft_s + linear.bias
    scales = [r.boft_s for r in rotations]
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, scales, dy), torch.autograd.grad(expected, scales, dy)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def linked(n=3, d=64, seed=0, block_size=8):
    torch.manual_seed(seed)
    wraps = []
    for _ in range(n):
        w = BOFTLinear(nn.Linear(d, d).requires_grad_(False))
        w.boft["a"] = ButterflyRotation(d, d, block_size, 3, init="random")
        w.active_adapters = ["a"]
        wraps.append(w)
    return wraps, [w.boft["a"] for w in wraps]


def loss_of(wraps, x):
    return sum((w(x) ** 2).sum() for w in wraps)


def test_q_k_v_save_their_shared_input_once_and_no_copy_of_it():
    wraps, _ = linked()
    x = torch.randn(2, 100, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sum(w(x).sum() for w in wraps)  # a loss that saves nothing itself
    sized_like_x = [t for t in saved if t.numel() == x.numel()]
    assert {t.data_ptr() for t in sized_like_x if t.data_ptr() != 0} >= {x.data_ptr()}
    # x itself in each node, plus each projection's matmul output u (for dL/ds); nothing else token-sized
    assert sum(t.data_ptr() == x.data_ptr() for t in sized_like_x) == 3 and len(sized_like_x) == 6


def test_linked_rotations_give_the_same_gradients_and_survive_accumulation_and_deepcopy():
    x = torch.randn(200, 64)
    (solo, solo_rot), (group, group_rot) = linked(), linked()
    link_rotations(group_rot)
    loss_of(solo, x).backward()
    loss_of(group, x).backward()
    for a, b in zip(solo_rot, group_rot):
        torch.testing.assert_close(a.boft_skew.grad, b.boft_skew.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.boft_s.grad, b.boft_s.grad, atol=1e-4, rtol=1e-5)
    first = [r.boft_skew.grad.clone() for r in group_rot]
    loss_of(group, x)  # a forward whose round is never used: the next one must not reuse its graph
    copy.deepcopy(nn.ModuleList(group))  # a round holding graph tensors is not copied
    loss_of(group, x).backward()  # same skew versions: a new round, not the spent graph
    for r, g in zip(group_rot, first):
        torch.testing.assert_close(r.boft_skew.grad, 2 * g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_recomputes_rounds_correctly(reentrant):
    x = torch.randn(200, 64, requires_grad=True)
    (plain, plain_rot), (ckpt, ckpt_rot) = linked(), linked()
    link_rotations(plain_rot)
    link_rotations(ckpt_rot)
    loss_of(plain, x).backward()
    total = sum(checkpoint(lambda x, w=w: (w(x) ** 2).sum(), x, use_reentrant=reentrant) for w in ckpt)
    total.backward()
    for a, b in zip(plain_rot, ckpt_rot):
        torch.testing.assert_close(a.boft_skew.grad, b.boft_skew.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [8, 4])  # fp32 b = 8: the C++ rows kernel where it runs; b = 4: chunks
def test_a_spent_round_is_freed_without_the_garbage_collector(monkeypatch, block_size):
    """Each step's round (blocks, chunks and their graph: ~40 MB in SD 1.5) must go when backward
    is done with it; waiting for a gc run costs fresh pages every step."""
    wraps, rotations = linked(block_size=block_size)
    link_rotations(rotations)
    x = torch.randn(200, 64)
    loss_of(wraps, x).backward()  # first use: each alone (the group learns who is used)
    made = []
    for function in (Cayley, chunk_ops.BuildChunks):
        real = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, real=real: (lambda out: made.append(weakref.ref(out)) or out)(real(*a)))
    gc.disable()
    try:
        loss_of(wraps, x).backward()
        assert len(made) == (1 if block_size == 8 and cpu.rows_supported(torch.float32, 8) else 2)  # one round
        assert all(ref() is None for ref in made)
    finally:
        gc.enable()


def test_sampling_computes_blocks_once_for_the_group_until_something_changes(monkeypatch):
    wraps, rotations = linked()
    link_rotations(rotations)
    calls = []
    real = Cayley.apply
    monkeypatch.setattr(Cayley, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(50, 64)
    with torch.no_grad():
        first = [w(x) for w in wraps]
        assert len(calls) == 3  # first use: each on its own (the group learns who is used)
        again = [w(x) for w in wraps]
        assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
        for r in rotations:
            r.set_active((1.0, 1.0, 0.0))
        [w(x) for w in wraps]
    assert len(calls) == 4 and calls[-1][1] == 3 * 64 // 8  # one batched solve for all three


def test_training_under_bf16_autocast_keeps_rotations_in_fp32():
    wraps, rotations = linked()
    link_rotations(rotations)
    x = torch.randn(200, 64)
    reference = [w(x) for w in wraps]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = [w(x) for w in wraps]
    assert all(o.dtype == torch.bfloat16 for o in out)
    for o, r in zip(out, reference):
        torch.testing.assert_close(o.float(), r, atol=0.1, rtol=0.02)
    sum((o.float() ** 2).sum() for o in out).backward()
    assert all(r.boft_skew.grad.dtype == torch.float32 and torch.isfinite(r.boft_skew.grad).all() for r in rotations)


def test_fractional_factor_scales_do_not_grow_the_order_memo():
    """A UI slider sends any fractional k: the memoised factor order is keyed by which factors are
    on, so a long-running server keeps at most 2^(m+1) entries, whatever values arrive."""
    rotation = ButterflyRotation(16, 8, 4, 3, init="random")
    x = torch.randn(5, 16)
    layers._active_order.cache_clear()
    for t in torch.linspace(0.01, 0.99, 200).tolist():
        rotation.set_active((1.0, t, 0.0))
        with torch.no_grad():
            rotation.rotate(x)
    assert rotation.order(False) == (1, 0) and rotation.factors() == (0, 1)
    assert 0 < layers._active_order.cache_info().currsize <= 2 ** (3 + 1)


def test_memoised_plans_follow_every_change_and_stay_bounded(monkeypatch):
    """BOFTLinear memoises how each call runs (side, chunks or blocks): switching factors,
    freezing the skew, grad mode, the kernel switch or the token count must still give the
    un-memoised result, and a server seeing many resolutions keeps at most 64 plans."""
    d, b = 64, 8
    wrap = BOFTLinear(nn.Linear(d, d).requires_grad_(False))
    wrap.boft["a"] = ButterflyRotation(d, d, b, 4, init="random")
    wrap.active_adapters = ["a"]
    rotation = wrap.boft["a"]

    def check(tokens):
        x = torch.randn(tokens, d, requires_grad=True)
        got, want = wrap(x), layers.boft_linear(x, wrap, [rotation])  # memoised vs planned afresh
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        z = rotate_rows(x, cayley(rotation.scaled_skew(), b), rotation.active)
        torch.testing.assert_close(got, z @ wrap.weight.T * rotation.boft_s + wrap.bias, atol=1e-5, rtol=0)
        if got.requires_grad:
            dy = torch.randn_like(got)
            params = [x] + [p for p in rotation.parameters() if p.requires_grad]
            for g1, g2 in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(want, params, dy)):
                torch.testing.assert_close(g1, g2, atol=1e-4, rtol=0)

    for tokens in (2, 300):
        check(tokens)
        rotation.set_active((1.0, 1.0, 0.0, 0.0))  # another chunk size and factor order
        check(tokens)
        rotation.set_active((1.0, 0.5, 1.0, 1.0))
        check(tokens)
        rotation.boft_skew.requires_grad_(False)
        check(tokens)
        rotation.boft_skew.requires_grad_(True)
        with torch.no_grad():
            check(tokens)
        monkeypatch.setenv("BOFT_KERNEL", "pytorch")
        check(tokens)
        monkeypatch.delenv("BOFT_KERNEL")
    assert len(wrap._plans) > 4
    with torch.no_grad():
        for tokens in range(1, 200):
            wrap(torch.randn(tokens, d))
    assert len(wrap._plans) <= 64


def test_small_chunks_paired_on_cpu_rotate_and_train_exactly():
    """m = 1 (c = b = 8) rotates by block-diagonal 16 x 16 chunks on CPU: the same outputs and
    gradients as the plain math, and the pairing's gradient keeps only the diagonal blocks."""
    chunks = torch.randn(6, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: chunk_ops.PadChunks.apply(c, 2), (chunks,))
    assert chunk_ops.padding(8, [64, 128], torch.device("cpu")) == 2
    assert chunk_ops.padding(8, [64, 72], torch.device("cpu")) == 1  # 72 = 9 x 8 cannot pair up
    assert chunk_ops.padding(64, [64], torch.device("cpu")) == 1
    wraps, rotations = [], []
    for d in (64, 128):
        w = BOFTLinear(nn.Linear(d, 32).requires_grad_(False))
        w.boft["a"] = ButterflyRotation(d, 32, 8, 1, init="random")
        w.active_adapters = ["a"]
        wraps.append(w)
        rotations.append(w.boft["a"])
    link_rotations(rotations)
    xs = [torch.randn(300, w.in_features, requires_grad=True) for w in wraps]
    ys = [w(x) for w, x in zip(wraps, xs)]
    assert rotations[0].step_tensors(want_chunks=True)[1].shape[-1] == 16
    for w, r, x, y in zip(wraps, rotations, xs, ys):
        expected = rotate_rows(x, cayley(r.boft_skew, 8)) @ w.weight.T * r.boft_s + w.bias
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
        dy = torch.randn_like(y)
        params = [x, r.boft_skew, r.boft_s]
        for got, want in zip(torch.autograd.grad(y, params, dy, retain_graph=True), torch.autograd.grad(expected, params, dy)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
